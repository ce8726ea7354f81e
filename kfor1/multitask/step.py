"""One compiled step that trains K task patches at once.

Each task's forward pass runs with its own patch and BatchNorm statistics (``vmap`` over the
task axis); the shared parameters enter every task unbatched. Gradients are taken only with
respect to trainable leaves, so frozen weights never get a gradient computed. Tasks with
different input resolutions are grouped: each group is vmapped, and all groups run inside the
same compiled step. Single-task transfer learning is simply K = 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfor1.microbatch import MicroBatch, TaskChunk, map_task_chunks, resolve_task_chunk
from kfor1.multitask.state import MultiTaskState
from kfor1.multitask.task_axis import (
    MASKED_LOGIT,
    Split,
    group_batches,
    inference_norm_layers,
    place,
    resolution_groups,
    take,
    task_forward,
)
from kfor1.tree import flatten, module_path, unflatten

__all__ = ["make_eval_step", "make_predict_fn", "make_stats_step", "make_train_step"]
_STEP_IDS = itertools.count()


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                           label_smoothing: float) -> jax.Array:
    """Cross-entropy of ``logits`` (B, C) against integer ``labels`` (B,), the targets smoothed
    by ``label_smoothing`` over the task's classes only (``mask`` (C,): a padded head's extra
    classes get no mass), as ``optax.smooth_labels`` does for a head of the task's width.
    Returns (B,)."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    valid = mask.astype(logits.dtype)
    targets = (1.0 - label_smoothing) * onehot + label_smoothing * valid / valid.sum()
    return optax.softmax_cross_entropy(logits, targets)


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
    label_smoothing: float = 0.0,
) -> Callable[[MultiTaskState, Any, jax.Array], tuple[MultiTaskState, dict[str, jax.Array]]]:
    """Builds the jitted step that trains all K tasks' patches at once.

    The loss is each task's cross-entropy, its targets smoothed by ``label_smoothing`` over the
    task's own classes (``smoothed_cross_entropy``), summed over tasks.

    The network runs in training mode when the patch owns BN statistics and trains something
    below the head, or the shared backbone is trained (``train_shared=True``, with
    ``patch_optimizer(..., shared_tx=...)``). Then each BatchNorm runs as its statistics' owner
    implies: the patch's own on batch statistics (updating them), the base's in inference mode
    on the base's statistics (``task_axis.inference_norm_layers``), so the network trained is
    the network evaluated and shipped. Otherwise the network runs in inference mode with its
    statistics as they are: the base's, or each task's own from ``make_stats_step`` (the
    ``stats`` preset: nothing the statistics see is trained, so they stay exact).

    ``task_chunk`` tasks run at a time inside the step (``kfor1.microbatch.map_task_chunks``;
    same result as one ``vmap`` over all tasks). ``"auto"``: tasks making ~64 images per chunk
    on a single CPU device, where a chunk's activations stay in cache (faster steps, longer
    compilation: ``benchmarks/README.md``); all tasks at once on accelerators and meshes. None:
    all tasks at once.

    Args:
      model: the Flax module, its classifier with ``state.layout.max_classes`` outputs; its
        ``__call__`` takes ``train_kwarg`` (True: BN uses batch statistics, dropout on).
      optimizer: the optax transform the state was built with (``patch_optimizer``).
      train_shared: also train the shared backbone (multi-task learning with a joint backbone).
      groups: task indices per resolution group; None groups tasks by ``Task.resolution``.
      train_kwarg: the name of the model's training-mode keyword.
      max_traces: fail if the step is traced more often (a test's guard against retracing).
      donate: donate the input state's buffers to the output (the caller's state is consumed).
      task_chunk: tasks per chunk inside the step: an int, "auto" or None (see above).

    Returns:
      ``step(state, batch, rng) -> (state, metrics)``. ``batch`` is ``{"images": (K, B, H, W,
      C), "labels": (K, B)}`` int labels, or a sequence of such dicts, one per resolution group;
      ``rng`` a PRNG key (dropout). ``metrics`` holds per-task ``loss`` and ``accuracy`` (K,).

    Example:
      >>> labels = kfor1.partition(base.variables, "scale_bias+logits")
      >>> tx = kfor1.patch_optimizer(optax.adam(1e-3), labels)
      >>> state = kfor1.init_multitask(base.variables, labels, tasks, tx)
      >>> step = kfor1.make_train_step(base.model.clone(num_classes=10), tx)
      >>> state, metrics = step(state, {"images": x, "labels": y}, jax.random.key(0))
      >>> metrics["loss"].shape  # (K,)
    """
    if task_chunk != "auto":
        resolve_task_chunk(task_chunk, 1, 1)  # Rejects a bad value now, not at the first step.

    def step(state: MultiTaskState, batch: Any, rng: jax.Array):
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = group_batches(batch, task_groups)
        split = Split(state)
        below_head = any(module_path(p) != layout.head for p in split.patch)
        bn_train = (bool(split.patch_stats) and below_head) or (train_shared and split.has_stats)
        class_mask = jnp.asarray(layout.class_mask())
        keys = jax.random.split(rng, k)
        forward = task_forward(model, train_kwarg, split, bn_train, bn_train,
                               inference_layers=inference_norm_layers(split, train_shared))
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
                    loss = smoothed_cross_entropy(logits, y, mask, label_smoothing).mean()
                    acc = jnp.mean(jnp.argmax(logits, -1) == y)
                    return loss, acc, new_stats

                chunk = resolve_task_chunk(task_chunk, len(idx), b["images"].shape[1])
                loss, acc, new_stats = map_task_chunks(task_loss, (
                    take(patch, idx, k), take(split.patch_stats, idx, k),
                    b["images"], b["labels"], class_mask[index], keys[index],
                ), chunk)
                total = total + loss.sum()
                losses = place(losses, loss, idx, k)
                accuracy = place(accuracy, acc, idx, k)
                for p in patch_stats if bn_train else ():
                    patch_stats[p] = place(patch_stats[p], new_stats[p], idx, k)
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
    """Builds the jitted evaluation of all K tasks: sums, so batches add up to a split's accuracy.

    BatchNorm runs in inference mode with each task's statistics; padded classes are masked.

    Args:
      model: the Flax module, as for ``make_train_step``.
      groups: task indices per resolution group; None groups tasks by ``Task.resolution``.
      train_kwarg: the name of the model's training-mode keyword.
      micro_batch: images per chunk of each task's batch (``kfor1.microbatch``: "auto" splits
        CPU batches of 64 or more; None: the batch at once).

    Returns:
      ``eval_step(state, batch) -> metrics``, with per-task sums of shape (K,): ``loss_sum``,
      ``correct`` and ``count``. ``batch`` is ``{"images": (K, B, H, W, C), "labels": (K, B)}``
      (or one such dict per resolution group); an optional ``mask`` (K, B) marks real examples,
      so the last, padded batch of a split counts correctly.

    Example:
      >>> eval_step = kfor1.make_eval_step(model)
      >>> sums = eval_step(state, {"images": x, "labels": y, "mask": real})
      >>> accuracy = sums["correct"] / sums["count"]  # (K,)
    """

    def step(state: MultiTaskState, batch: Any) -> dict[str, jax.Array]:
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = group_batches(batch, task_groups)
        split = Split(state)
        forward = task_forward(model, train_kwarg, split, False, False, micro_batch)
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
                take(split.patch, idx, k), take(split.patch_stats, idx, k),
                b["images"], b["labels"], weights, class_mask[index],
            )
            for name, value in zip(("loss_sum", "correct", "count"), (loss, correct, count)):
                out[name] = place(out[name], value, idx, k)
        return out

    return jax.jit(step)


def make_stats_step(
    model: nn.Module, *, groups: Sequence[Sequence[int]] | None = None, train_kwarg: str = "train"
) -> Callable[[MultiTaskState, Any, jax.Array], dict[str, jax.Array]]:
    """Builds the jitted pass that measures each task's BatchNorm statistics (the ``stats`` patch).

    The network runs in training mode (each layer normalised by its batch's statistics) with no
    gradient; ``kfor1.trainer.adabn`` averages the result over batches. Any BatchNorm with Flax's
    update
    ``new = m * old + (1 - m) * batch`` works, whatever its momentum ``m``: the step applies the
    model from statistics of 0 and of 1, which gives ``(1 - m) * batch`` and ``m``.

    Args:
      model: the Flax module, as for ``make_train_step``.
      groups: task indices per resolution group; None groups tasks by ``Task.resolution``.
      train_kwarg: the name of the model's training-mode keyword.

    Returns:
      ``stats_step(state, batch, rng) -> {path: (K, C)}``: each task's batch mean and variance
      at every BatchNorm layer whose statistics the patch owns (``batch_stats`` paths ending in
      ``/mean`` and ``/var``). ``batch`` holds ``"images"`` (K, B, H, W, C) and optionally
      ``"mask"`` (K, B) bool: then only the real images count, each once, in every layer's
      batch statistics (a last, padded batch; a fully masked task gives zeros).

    Example:
      >>> stats_step = kfor1.make_stats_step(model)
      >>> stats = stats_step(state, {"images": x}, jax.random.key(0))
      >>> stats["blocks_0/depthwise/bn/mean"].shape  # (K, 32) on EfficientNet-Lite0
    """

    def step(state: MultiTaskState, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        layout = state.layout
        k = layout.num_tasks
        task_groups = resolution_groups(layout, groups)
        batches = group_batches(batch, task_groups)
        split = Split(state)
        forward = task_forward(model, train_kwarg, split, True, True,
                               inference_layers=inference_norm_layers(split, False))
        keys = jax.random.split(rng, k)
        out = {p: jnp.zeros_like(v) for p, v in split.patch_stats.items()}
        for idx, b in zip(task_groups, batches):

            def task_stats(p, ps, x, key, w):
                _, zero = forward(p, jax.tree.map(jnp.zeros_like, ps), split.shared,
                                  split.shared_stats, x, key, w)
                _, one = forward(p, jax.tree.map(jnp.ones_like, ps), split.shared,
                                 split.shared_stats, x, key, w)
                # one - zero = m; zero = (1 - m) * batch.
                return {q: zero[q] / (1.0 - (one[q] - zero[q])) for q in ps}

            masks = b["mask"] if "mask" in b else jnp.ones(b["images"].shape[:2], bool)
            stats = jax.vmap(task_stats)(
                take(split.patch, idx, k), take(split.patch_stats, idx, k), b["images"],
                keys[np.asarray(idx)], masks,
            )
            out = {p: place(out[p], stats[p], idx, k) for p in out}
        return out

    return jax.jit(step)


def make_predict_fn(
    model: nn.Module, *, train_kwarg: str = "train", micro_batch: MicroBatch = "auto"
) -> Callable[[MultiTaskState, jax.Array], jax.Array]:
    """Builds the jitted K-task inference: every task's class probabilities for its images.

    Args:
      model: the Flax module, as for ``make_train_step``.
      train_kwarg: the name of the model's training-mode keyword.
      micro_batch: images per chunk of each task's batch, as for ``make_eval_step``.

    Returns:
      ``predict(state, images) -> probabilities``: images (K, B, H, W, C), preprocessed as in
      training, give (K, B, max_classes) probabilities, padded classes at exactly 0.

    Example:
      >>> predict = kfor1.make_predict_fn(model)
      >>> probabilities = predict(state, x)  # x: (K, B, H, W, 3)
      >>> top1 = probabilities.argmax(-1)  # (K, B)
    """

    def predict(state: MultiTaskState, images: jax.Array) -> jax.Array:
        split = Split(state)
        forward = task_forward(model, train_kwarg, split, False, False, micro_batch)
        mask = jnp.asarray(state.layout.class_mask())

        def one(p, ps, x, m):
            logits, _ = forward(p, ps, split.shared, split.shared_stats, x, None)
            return jax.nn.softmax(jnp.where(m, logits, MASKED_LOGIT), axis=-1)

        return jax.vmap(one)(split.patch, split.patch_stats, images, mask)

    return jax.jit(predict)
