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


def _running_average(layers: frozenset[str]):
    """A Flax method interceptor: each normalization layer in ``layers`` (by module path)
    runs on its running statistics, whatever mode its parent asked for."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not hasattr(module, "use_running_average")
                or "/".join(module.path) not in layers):
            return next_fun(*args, **kwargs)
        if module.use_running_average is None:  # The mode is a call argument.
            clone = module.clone(parent=None)
            args, kwargs = args[:1], {**kwargs, "use_running_average": True}
        else:
            clone = module.clone(parent=None, use_running_average=True)
        return clone.apply(dict(module.variables), *args, **kwargs)

    return interceptor


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
    statistics in a training-mode pass (``inference_norm_layers``).
    """

    def apply(variables, images, **kwargs):
        if train and inference_layers:
            with nn.intercept_methods(_running_average(inference_layers)):
                return model.apply(variables, images, **kwargs)
        return model.apply(variables, images, **kwargs)

    def forward(patch, patch_stats, shared, shared_stats, images, key):
        variables = {"params": unflatten({**shared, **patch})}
        if split.has_stats:
            variables["batch_stats"] = unflatten({**shared_stats, **patch_stats})
        kwargs = {train_kwarg: train}
        if train:
            kwargs["rngs"] = {"dropout": key}
        if update_stats:
            logits, updates = apply(variables, images, mutable=["batch_stats"], **kwargs)
            new_stats = flatten(updates["batch_stats"])
        elif train:
            logits, new_stats = apply(variables, images, **kwargs), {}
        else:
            logits = map_micro_batches(
                lambda x: model.apply(variables, x, **kwargs), images, micro_batch
            )
            new_stats = {}
        return logits.astype(jnp.float32), new_stats

    return forward
