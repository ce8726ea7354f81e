"""The task axis of a K-task state: tasks grouped by resolution, and one task's forward pass.

A ``MultiTaskState`` stacks each task's patch and BatchNorm statistics on a leading axis of
size K and stores the shared parameters once. The steps (``kfor1.multitask.step``) split its flat
parameters into those two parts (``Split``), ``vmap`` a single task's forward pass
(``task_forward``) over the stacked part, and run tasks whose inputs differ in resolution as
separate groups of the same compiled step (``resolution_groups``, ``group_batches``); ``take``
and ``place`` move a group's slice of the task axis out and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kfor1.microbatch import MicroBatch, map_micro_batches
from kfor1.multitask.state import Layout, MultiTaskState
from kfor1.tree import flatten, module_path, unflatten

Batch = Mapping[str, jax.Array]
# Padded classes get this logit: exp() underflows to exactly 0 in float32.
MASKED_LOGIT = -1e9


def resolution_groups(layout: Layout, groups: Sequence[Sequence[int]] | None = None):
    """Task indices per resolution group: given, else by the tasks' ``resolution``."""
    k = layout.num_tasks
    if groups is None:
        order: dict[Any, list[int]] = {}
        for i, task in enumerate(layout.tasks):
            order.setdefault(task.resolution, []).append(i)
        return tuple(tuple(g) for g in order.values())
    groups = tuple(tuple(int(i) for i in g) for g in groups)
    for g in groups:
        if not g:
            raise ValueError(
                "a resolution group has no tasks; remove it or give it task indices"
            )
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(k)):
        raise ValueError(
            f"resolution groups {groups} must cover each of the {k} task indices exactly once"
        )
    return groups


def group_batches(batch: Any, groups: tuple[tuple[int, ...], ...]) -> tuple[Batch, ...]:
    """One batch dict per resolution group, checked against the groups' task counts."""
    batches = (batch,) if isinstance(batch, Mapping) else tuple(batch)
    if len(batches) != len(groups):
        raise ValueError(
            f"got {len(batches)} batches for {len(groups)} resolution groups {groups}; pass "
            "one {'images', 'labels'} dict per group, in group order"
        )
    for g, b in zip(groups, batches):
        if "images" not in b:
            raise ValueError(f"a batch needs 'images' (K, B, H, W, C), got keys {list(b)}")
        images = b["images"]
        if images.ndim != 5 or images.shape[0] != len(g):
            raise ValueError(
                f"images of shape {images.shape} for a group of {len(g)} tasks; expected "
                f"(K={len(g)}, B, H, W, C): K of the batch must equal K of the state"
            )
        if "labels" in b and b["labels"].shape != images.shape[:2]:
            raise ValueError(
                f"labels of shape {b['labels'].shape} do not match images {images.shape}; "
                "expected (K, B)"
            )
    return batches


class Split:
    """The state's flat parameters and statistics, split into patch (stacked) and shared."""

    def __init__(self, state: MultiTaskState):
        layout = state.layout
        patch, patch_stats = layout.patch_paths(), layout.patch_stat_paths()
        params, stats = flatten(state.params), flatten(state.batch_stats)
        self.patch = {p: v for p, v in params.items() if p in patch}
        self.shared = {p: v for p, v in params.items() if p not in patch}
        self.patch_stats = {p: v for p, v in stats.items() if p in patch_stats}
        self.shared_stats = {p: v for p, v in stats.items() if p not in patch_stats}
        self.has_stats = bool(stats)


def take(tree: dict[str, jax.Array], idx: tuple[int, ...], k: int) -> dict[str, jax.Array]:
    """The tasks ``idx`` of each stacked leaf (K, ...) -> (len(idx), ...)."""
    if idx == tuple(range(k)):
        return tree
    index = np.asarray(idx)
    return {p: v[index] for p, v in tree.items()}


def place(full: jax.Array, part: jax.Array, idx: tuple[int, ...], k: int) -> jax.Array:
    """``full`` (K, ...) with the rows of tasks ``idx`` set to ``part`` (len(idx), ...)."""
    if idx == tuple(range(k)):
        return part
    return full.at[np.asarray(idx)].set(part)


def inference_norm_layers(split: Split, train_shared: bool) -> frozenset[str]:
    """The normalization layers that run in inference mode in a training-mode pass: those
    whose statistics the base owns (``split.shared_stats``), unless the shared backbone is
    trained (then every layer's statistics follow its batches).

    Why: a patch that owns some layers' statistics (``input_stats``, a ``patch_rules`` subset)
    and trains below the head runs its own layers on batch statistics; the other layers keep
    the base's statistics, which evaluation, patch files, servers and exports use. Normalising
    them by batch statistics in training would train one network and ship another (issue 36:
    ``input_stats+depthwise+logits`` scored 10% on digits).
    """
    if train_shared:
        return frozenset()
    return frozenset(module_path(p) for p in split.shared_stats)


def _norm_modes(inference_layers: frozenset[str], weights: jax.Array | None):
    """A Flax method interceptor over normalization layers (modules with a
    ``use_running_average`` field): those in ``inference_layers`` (module paths) run on their
    running statistics whatever mode their parent asked for; with ``weights`` (B,), the others
    that run on batch statistics take them over the weighted images only
    (``_weighted_batch_norm``)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not hasattr(module, "use_running_average"):
            return next_fun(*args, **kwargs)
        if "/".join(module.path) in inference_layers:
            if module.use_running_average is None:  # The mode is a call argument.
                clone = module.clone(parent=None)
                args, kwargs = args[:1], {**kwargs, "use_running_average": True}
            else:
                clone = module.clone(parent=None, use_running_average=True)
            return clone.apply(dict(module.variables), *args, **kwargs)
        if weights is not None and _on_batch_statistics(module, args, kwargs):
            return _weighted_batch_norm(module, args[0], weights)
        return next_fun(*args, **kwargs)

    return interceptor


def _on_batch_statistics(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a BatchNorm call normalises over its batch, over the last axis only."""
    mode = module.use_running_average
    if mode is None:
        mode = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    last_axis = getattr(module, "axis", -1) in (-1, args[0].ndim - 1)
    return (mode is False and last_axis and getattr(module, "axis_name", None) is None
            and not kwargs.get("mask") and not kwargs.get("fold"))


def _weighted_batch_norm(module: nn.Module, x: jax.Array, weights: jax.Array) -> jax.Array:
    """A training-mode BatchNorm whose statistics count each image by its weight (0 for the
    padding of a last batch), stored as the layer's new statistics: what the layer computes
    on a batch of the real images alone."""
    xf = x.astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    axes = tuple(range(x.ndim - 1))
    count = jnp.maximum(weights.astype(jnp.float32).sum() * np.prod(x.shape[1:-1]), 1.0)
    mean = (xf * w).sum(axes) / count
    var = jnp.maximum((xf * xf * w).sum(axes) / count - mean * mean, 0.0)
    if not module.is_initializing():
        module.put_variable("batch_stats", "mean", mean)
        module.put_variable("batch_stats", "var", var)
    y = (xf - mean) * jax.lax.rsqrt(var + module.epsilon)
    if getattr(module, "use_scale", True):
        y = y * module.get_variable("params", "scale")
    if getattr(module, "use_bias", True):
        y = y + module.get_variable("params", "bias")
    return y.astype(module.dtype or x.dtype)


def task_forward(
    model: nn.Module,
    train_kwarg: str,
    split: Split,
    train: bool,
    update_stats: bool,
    micro_batch: MicroBatch = None,
    inference_layers: frozenset[str] = frozenset(),
):
    """A single task's forward pass: f(patch_k, stats_k, shared, shared_stats, x, key).

    Inference (``train`` and ``update_stats`` False) runs over ``micro_batch``-image chunks.
    ``inference_layers``: normalization layers (module paths) that run on their running
    statistics in a training-mode pass (``inference_norm_layers``). ``weights`` (B,), in a
    training-mode pass: the other layers' batch statistics count each image by its weight.
    """

    def apply(variables, images, weights, **kwargs):
        if train and (inference_layers or weights is not None):
            with nn.intercept_methods(_norm_modes(inference_layers, weights)):
                return model.apply(variables, images, **kwargs)
        return model.apply(variables, images, **kwargs)

    def forward(patch, patch_stats, shared, shared_stats, images, key, weights=None):
        variables = {"params": unflatten({**shared, **patch})}
        if split.has_stats:
            variables["batch_stats"] = unflatten({**shared_stats, **patch_stats})
        kwargs = {train_kwarg: train}
        if train:
            kwargs["rngs"] = {"dropout": key}
        if update_stats:
            logits, updates = apply(variables, images, weights, mutable=["batch_stats"],
                                    **kwargs)
            new_stats = flatten(updates["batch_stats"])
        elif train:
            logits, new_stats = apply(variables, images, weights, **kwargs), {}
        else:
            logits = map_micro_batches(
                lambda x: model.apply(variables, x, **kwargs), images, micro_batch
            )
            new_stats = {}
        return logits.astype(jnp.float32), new_stats

    return forward
