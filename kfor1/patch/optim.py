"""The patch optimiser, from ``config.learning_rate`` (or transforms of your own) to one
``optax.partition`` that updates patch leaves only.

Shared leaves get ``optax.set_to_zero()`` (frozen: no optimiser state is allocated for them) or a
transform of their own (joint multi-task training of the backbone). Each patch group has its own
transform: BatchNorm scale/bias wants a larger learning rate than the classifier. Every label in
the tree must be covered, and a missing one is named before any state is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from kfor1.patch.spec import SHARED

SCHEDULES = ("cosine", "constant", "onecycle")
OPTIMIZERS = ("adamw", "adam", "sgd")


def label_set(labels: Any) -> set[str]:
    """The distinct labels of a label tree (``partition(..., groups=True)``'s output)."""
    return set(jax.tree.leaves(labels))


def patch_groups(labels: Any) -> list[str]:
    """The patch groups of a label tree, sorted: every label but ``"shared"``."""
    return sorted(label_set(labels) - {SHARED})


def _partition(
    transforms: Mapping[str, optax.GradientTransformation],
    labels: Any,
    shared_tx: optax.GradientTransformation | None,
) -> optax.GradientTransformation:
    return optax.partition(
        {**transforms, SHARED: optax.set_to_zero() if shared_tx is None else shared_tx}, labels
    )


def patch_optimizer(
    tx: optax.GradientTransformation | Mapping[str, optax.GradientTransformation],
    labels: Any,
    shared_tx: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """The optimiser of a labelled parameter tree.

    Args:
      tx: one transform for every patch leaf, or ``{group: transform}`` for labels from
        ``partition(..., groups=True)``.
      labels: the label tree, shaped like the parameters.
      shared_tx: the shared leaves' transform (joint training); None freezes them.

    Returns:
      An ``optax.partition`` of the groups' transforms.

    Example:
      >>> labels = kfor1.partition(variables, "scale_bias+logits", groups=True)
      >>> tx = kfor1.patch_optimizer(
      ...     {"scale_bias": optax.adam(1e-2), "logits": optax.adam(3e-3)}, labels)
      >>> tx = kfor1.patch_optimizer(optax.adamw(1e-3), labels)  # one transform for all groups
    """
    groups = patch_groups(labels)
    if not isinstance(tx, Mapping):
        return _partition(dict.fromkeys(groups, tx), labels, shared_tx)
    missing = [g for g in groups if g not in tx]
    if missing:
        raise ValueError(
            f"no optimiser for patch group(s) {missing}; give one per group in "
            f"{groups} (labels come from partition(..., groups=True))"
        )
    return _partition({g: tx[g] for g in groups}, labels, shared_tx)


def schedule(config: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    """``config.schedule`` over ``config.num_steps`` with ``config.warmup_steps``, up to
    ``peak``."""
    steps = max(int(config.num_steps), 1)
    warmup = min(int(config.warmup_steps), steps - 1)
    if config.schedule == "constant":
        return (optax.linear_schedule(0.0, peak, warmup) if warmup
                else optax.constant_schedule(peak))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, end_value=0.0)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(steps, peak)
    raise ValueError(f"config.schedule={config.schedule!r}; use {', '.join(SCHEDULES[:-1])} or "
                     f"{SCHEDULES[-1]}")


def transform(
    config: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
    """``config.optimizer`` (with ``weight_decay``, ``momentum``) at learning rate ``lr``."""
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(lr, momentum=config.momentum))
    raise ValueError(f"config.optimizer={config.optimizer!r}; use {', '.join(OPTIMIZERS[:-1])} "
                     f"or {OPTIMIZERS[-1]}")


def build_optimizer(
    config: ml_collections.ConfigDict, labels: Any
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """Everything the config says about optimisation, as one optimiser.

    Args:
      config: reads ``learning_rate`` (one entry per patch group, and ``shared`` when
        ``train_shared``), ``schedule``, ``num_steps``, ``warmup_steps``, ``optimizer``,
        ``weight_decay``, ``momentum``, ``train_shared``.
      labels: ``partition(variables, spec, groups=True)``.

    Returns:
      ``(optimiser, {group: schedule})``; the schedules are for logging learning rates.
    """
    groups = patch_groups(labels) + ([SHARED] if config.train_shared else [])
    rates = config.learning_rate
    missing = [g for g in groups if g not in rates]
    if missing:
        raise ValueError(
            f"config.learning_rate has no entry for {missing}; add e.g. "
            f"--config.learning_rate.{missing[0]}=1e-3"
        )
    schedules = {g: schedule(config, float(rates[g])) for g in groups}
    transforms = {g: transform(config, schedules[g]) for g in groups}
    shared_tx = transforms.pop(SHARED, None)
    return _partition(transforms, labels, shared_tx), schedules
