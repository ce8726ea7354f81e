"""One compiled step that trains K task patches at once.

Each task's forward pass runs with its own patch and BatchNorm statistics (``vmap`` over the
task axis); the shared parameters enter every task unbatched. Gradients are taken only with
respect to trainable leaves, so frozen weights never get a gradient computed. Tasks with
different input resolutions are grouped: each group is vmapped, and all groups run inside the
same compiled step. Single-task transfer learning is simply K = 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfor1.microbatch import (
    MicroBatch,
    TaskChunk,
    map_micro_batches,
    map_task_chunks,
    resolve_task_chunk,
)
from kfor1.multitask import Layout, MultiTaskState
from kfor1.tree import flatten, module_path, unflatten

Batch = Mapping[str, jax.Array]
_STEP_IDS = itertools.count()
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


def _group_batches(batch: Any, groups: tuple[tuple[int, ...], ...]) -> tuple[Batch, ...]:
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


class _Split:
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


def _take(tree: dict[str, jax.Array], idx: tuple[int, ...], k: int) -> dict[str, jax.Array]:
    if idx == tuple(range(k)):
        return tree
    index = np.asarray(idx)
    return {p: v[index] for p, v in tree.items()}


def _place(full: jax.Array, part: jax.Array, idx: tuple[int, ...], k: int) -> jax.Array:
    if idx == tuple(range(k)):
        return part
    return full.at[np.asarray(idx)].set(part)


def _forward(
    model: nn.Module,
    train_kwarg: str,
    split: _Split,
    train: bool,
    update_stats: bool,
    micro_batch: MicroBatch = None,
):
    """A single task's forward pass: f(patch_k, stats_k, shared, shared_stats, x, key).

    Inference (``train`` and ``update_stats`` False) runs over ``micro_batch``-image chunks.
    """

    def forward(patch, patch_stats, shared, shared_stats, images, key):
        variables = {"params": unflatten({**shared, **patch})}
        if split.has_stats:
            variables["batch_stats"] = unflatten({**shared_stats, **patch_stats})
        kwargs = {train_kwarg: train}
        if train:
            kwargs["rngs"] = {"dropout": key}
        if update_stats:
            logits, updates = model.apply(variables, images, mutable=["batch_stats"], **kwargs)
            new_stats = flatten(updates["batch_stats"])
        elif train:
            logits, new_stats = model.apply(variables, images, **kwargs), {}
        else:
            logits = map_micro_batches(
                lambda x: model.apply(variables, x, **kwargs), images, micro_batch
            )
            new_stats = {}
        return logits.astype(jnp.float32), new_stats

    return forward


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    train_shared: bool = False,
    groups: Sequence[Sequence[int]] | None = None,
    train_kwarg: str = "train",
    max_traces: int | None = None,
    donate: bool = True,
    task_chunk: TaskChunk = "auto",
) -> Callable[[MultiTaskState, Any, jax.Array], tuple[MultiTaskState, dict[str, jax.Array]]]:
    """Returns ``step(state, batch, rng) -> (state, metrics)``, jitted.

    ``batch`` is ``{"images": (K, B, H, W, C), "labels": (K, B)}``, or a sequence of such dicts,
    one per resolution group. ``metrics`` holds per-task ``loss`` and ``accuracy`` of shape (K,).
    ``model`` is a Flax module whose classifier has ``max(num_classes)`` outputs and whose
    ``__call__`` takes ``train_kwarg`` (True: BN uses batch statistics, dropout on).

    BatchNorm runs in training mode, updating statistics, when the patch owns BN statistics and
    trains something below the head, or the shared backbone is trained (``train_shared=True``,
    with ``patch_optimizer(..., shared_tx=...)``); otherwise the network runs in inference mode
    with its statistics as they are: the base's, or each task's own from ``make_stats_step``
    (the ``stats`` preset: nothing the statistics see is trained, so they stay exact).

    ``task_chunk`` tasks run at a time inside the step (``kfor1.microbatch.map_task_chunks``;
    same result as one ``vmap`` over all tasks). ``"auto"``: tasks making ~64 images per chunk
    on a single CPU device, where a chunk's activations stay in cache (faster steps, longer
    compilation: ``benchmarks/README.md``); all tasks at once on accelerators and meshes. None:
    all tasks at once.
    """
    if task_chunk != "auto":
        resolve_task_chunk(task_chunk, 1, 1)  # Rejects a bad value now, not at the first step.

    def step(state: MultiTaskState, batch: Any, rng: jax.Array):
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = _group_batches(batch, task_groups)
        split = _Split(state)
        below_head = any(module_path(p) != layout.head for p in split.patch)
        bn_train = (bool(split.patch_stats) and below_head) or (train_shared and split.has_stats)
        class_mask = jnp.asarray(layout.class_mask())
        keys = jax.random.split(rng, k)
        forward = _forward(model, train_kwarg, split, bn_train, bn_train)
        frozen = {} if train_shared else split.shared

        def total_loss(patch, shared_trainable):
            shared = {**frozen, **shared_trainable}
            losses = jnp.zeros((k,))
            accuracy = jnp.zeros((k,))
            patch_stats = dict(split.patch_stats)
            shared_stats_per_task = []
            total = 0.0
            for idx, b in zip(task_groups, batches):
                index = np.asarray(idx)

                def task_loss(p, ps, x, y, mask, key):
                    logits, new_stats = forward(p, ps, shared, split.shared_stats, x, key)
                    logits = jnp.where(mask, logits, MASKED_LOGIT)
                    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                    acc = jnp.mean(jnp.argmax(logits, -1) == y)
                    return loss, acc, new_stats

                chunk = resolve_task_chunk(task_chunk, len(idx), b["images"].shape[1])
                loss, acc, new_stats = map_task_chunks(task_loss, (
                    _take(patch, idx, k), _take(split.patch_stats, idx, k),
                    b["images"], b["labels"], class_mask[index], keys[index],
                ), chunk)
                total = total + loss.sum()
                losses = _place(losses, loss, idx, k)
                accuracy = _place(accuracy, acc, idx, k)
                for p in patch_stats if bn_train else ():
                    patch_stats[p] = _place(patch_stats[p], new_stats[p], idx, k)
                shared_stats_per_task.append(
                    {p: v for p, v in new_stats.items() if p in split.shared_stats}
                )
            return total, (losses, accuracy, patch_stats, shared_stats_per_task)

        shared_trainable = split.shared if train_shared else {}
        (_, (losses, accuracy, patch_stats, shared_stats_per_task)), (g_patch, g_shared) = (
            jax.value_and_grad(total_loss, argnums=(0, 1), has_aux=True)(
                split.patch, shared_trainable
            )
        )
        # Frozen leaves get zeros only to fit the multi_transform's tree; set_to_zero drops them.
        grads = {p: jnp.zeros_like(v) for p, v in frozen.items()} | g_patch | g_shared
        updates, opt_state = optimizer.update(unflatten(grads), state.opt_state, state.params)
        updates = flatten(updates)
        trainable = set(g_patch) | set(g_shared)
        params = {
            p: (v + updates[p].astype(v.dtype) if p in trainable else v)
            for p, v in flatten(state.params).items()
        }
        shared_stats = split.shared_stats
        if train_shared and shared_stats:
            # The shared statistics follow the average of what every task's batch says.
            shared_stats = {
                p: jnp.concatenate([s[p] for s in shared_stats_per_task]).mean(0)
                for p in shared_stats
            }
        new_state = state.replace(
            step=state.step + 1,
            params=unflatten(params),
            batch_stats=unflatten({**shared_stats, **patch_stats}),
            opt_state=opt_state,
        )
        return new_state, {"loss": losses, "accuracy": accuracy}

    if max_traces is not None:
        # chex counts traces per (call stack, source, name): a unique name gives each train step
        # its own budget, else steps built at one call site would share (and exhaust) it.
        step.__name__ = f"train_step_{next(_STEP_IDS)}"
        step = chex.assert_max_traces(step, n=max_traces)
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    model: nn.Module,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    train_kwarg: str = "train",
    micro_batch: MicroBatch = "auto",
) -> Callable[[MultiTaskState, Any], dict[str, jax.Array]]:
    """Returns ``eval_step(state, batch) -> metrics`` with per-task sums of shape (K,):
    ``loss_sum``, ``correct`` and ``count``. An optional ``mask`` (K, B) in the batch marks real
    examples, so the last, padded batch of an epoch counts correctly. Each task's batch runs in
    chunks of ``micro_batch`` images (``kfor1.microbatch``: "auto" splits CPU batches of 64+).
    """

    def step(state: MultiTaskState, batch: Any) -> dict[str, jax.Array]:
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = _group_batches(batch, task_groups)
        split = _Split(state)
        forward = _forward(model, train_kwarg, split, False, False, micro_batch)
        class_mask = jnp.asarray(layout.class_mask())
        out = {name: jnp.zeros((k,)) for name in ("loss_sum", "correct", "count")}
        for idx, b in zip(task_groups, batches):
            index = np.asarray(idx)
            weights = b.get("mask", jnp.ones(b["labels"].shape, bool)).astype(jnp.float32)

            def task_metrics(p, ps, x, y, w, mask):
                logits, _ = forward(p, ps, split.shared, split.shared_stats, x, None)
                logits = jnp.where(mask, logits, MASKED_LOGIT)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
                return (loss * w).sum(), (correct * w).sum(), w.sum()

            loss, correct, count = jax.vmap(task_metrics)(
                _take(split.patch, idx, k), _take(split.patch_stats, idx, k),
                b["images"], b["labels"], weights, class_mask[index],
            )
            for name, value in zip(("loss_sum", "correct", "count"), (loss, correct, count)):
                out[name] = _place(out[name], value, idx, k)
        return out

    return jax.jit(step)


def make_stats_step(
    model: nn.Module, *, groups: Sequence[Sequence[int]] | None = None, train_kwarg: str = "train"
) -> Callable[[MultiTaskState, Any, jax.Array], dict[str, jax.Array]]:
    """Returns ``stats_step(state, batch, rng) -> {path: (K, C)}``: each task's batch mean and
    variance at every BatchNorm layer whose statistics the patch owns (``batch_stats`` paths,
    ``.../mean`` and ``.../var``), with the network in training mode (each layer normalised by
    its batch's statistics) and no gradient. ``kfor1.adabn`` averages them over batches.

    Any BatchNorm with Flax's update ``new = m * old + (1 - m) * batch`` works, whatever its
    momentum ``m``: the step applies the model from statistics of 0 and of 1, which gives
    ``(1 - m) * batch`` and ``m``.
    """

    def step(state: MultiTaskState, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = _group_batches(batch, task_groups)
        split = _Split(state)
        forward = _forward(model, train_kwarg, split, True, True)
        keys = jax.random.split(rng, k)
        out = {p: jnp.zeros_like(v) for p, v in split.patch_stats.items()}
        for idx, b in zip(task_groups, batches):

            def task_stats(p, ps, x, key):
                _, zero = forward(p, jax.tree.map(jnp.zeros_like, ps), split.shared,
                                  split.shared_stats, x, key)
                _, one = forward(p, jax.tree.map(jnp.ones_like, ps), split.shared,
                                 split.shared_stats, x, key)
                # one - zero = m; zero = (1 - m) * batch.
                return {q: zero[q] / (1.0 - (one[q] - zero[q])) for q in ps}

            stats = jax.vmap(task_stats)(
                _take(split.patch, idx, k), _take(split.patch_stats, idx, k), b["images"],
                keys[np.asarray(idx)],
            )
            out = {p: _place(out[p], stats[p], idx, k) for p in out}
        return out

    return jax.jit(step)


def make_predict_fn(
    model: nn.Module, *, train_kwarg: str = "train", micro_batch: MicroBatch = "auto"
) -> Callable[[MultiTaskState, jax.Array], jax.Array]:
    """Returns ``predict(state, images (K, B, H, W, C)) -> probabilities (K, B, max_classes)``,
    with padded classes at exactly 0; in chunks of ``micro_batch`` images, as ``make_eval_step``.
    """

    def predict(state: MultiTaskState, images: jax.Array) -> jax.Array:
        split = _Split(state)
        forward = _forward(model, train_kwarg, split, False, False, micro_batch)
        mask = jnp.asarray(state.layout.class_mask())

        def one(p, ps, x, m):
            logits, _ = forward(p, ps, split.shared, split.shared_stats, x, None)
            return jax.nn.softmax(jnp.where(m, logits, MASKED_LOGIT), axis=-1)

        return jax.vmap(one)(split.patch, split.patch_stats, images, mask)

    return jax.jit(predict)
