"""The patch optimiser: an ``optax.multi_transform`` that trains patch leaves only.

Shared leaves get ``optax.set_to_zero()`` (frozen: no optimiser state is allocated for them) or
``shared_tx`` (joint multi-task training of the backbone). Patch groups may each have their own
transform: BatchNorm scale/bias wants a larger learning rate than the classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from kfor1.spec import SHARED


def label_set(labels: Any) -> set[str]:
    return set(jax.tree.leaves(labels))


def patch_optimizer(
    tx: optax.GradientTransformation | Mapping[str, optax.GradientTransformation],
    labels: Any,
    shared_tx: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Builds the optimiser for a labelled parameter tree.

    ``tx`` is one transform for every patch leaf, or ``{group: transform}`` for labels from
    ``partition(..., groups=True)`` (e.g. ``{"scale_bias": adam(1e-2), "logits": adam(3e-3)}``).
    """
    groups = sorted(label_set(labels) - {SHARED})
    if isinstance(tx, Mapping):
        missing = [g for g in groups if g not in tx]
        if missing:
            raise ValueError(
                f"no optimiser for patch group(s) {missing}; give one per group in "
                f"{groups} (labels come from partition(..., groups=True))"
            )
        transforms = {g: tx[g] for g in groups}
    else:
        transforms = {g: tx for g in groups}
    transforms[SHARED] = optax.set_to_zero() if shared_tx is None else shared_tx
    return optax.multi_transform(transforms, labels)
