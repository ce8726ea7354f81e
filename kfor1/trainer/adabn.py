"""The ``stats`` patch (AdaBN, Li et al. 2016): each task's BatchNorm statistics re-estimated on
its own training images before training, with no gradient and no parameter of the backbone
changed; ``input_stats`` does the same for the stem's BatchNorm only (the pass is the same, and
only the statistics the patch owns are kept).

A base pretrained on ImageNet normalises every layer with ImageNet's means and variances; on
data whose statistics differ (grayscale digits, medical scans, another resolution) the features
the head sees are off-centre. The pass here runs each task's un-augmented training images (the
evaluation transform, so the statistics are those of the images the patch will be evaluated
on) through the network in training mode and pools each layer's batch statistics exactly:
the mean of the batch means and, for the variance, ``E[x^2] - E[x]^2`` over all images. The
head is then trained on these features with BatchNorm in inference mode, so nothing it sees
changes under it (``kfor1.multitask.step.make_train_step``). With ``scale_bias`` the pass is a warm
start: the statistics then follow the trained scales during training.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from kfor1 import data as kdata
from kfor1.multitask.state import MultiTaskState
from kfor1.multitask.step import make_stats_step
from kfor1.multitask.task_axis import resolution_groups
from kfor1.trainer.evaluate import group_batches
from kfor1.trainer.experiment import Setup
from kfor1.tree import flatten, leaf_name, unflatten


def _mean_of(var_path: str) -> str:
    """``a/b/var`` -> ``a/b/mean``: the mean beside a variance."""
    return var_path[: -len("var")] + "mean"


def reestimate_stats(
    s: Setup, state: MultiTaskState, *, images: int | None = None, seed: int = 0
) -> MultiTaskState:
    """The state with every task's patch BatchNorm statistics estimated on up to ``images``
    (default ``config.stats_images``) of its training images.

    Args:
      s: the run's setup (its tasks need their train splits).
      state: a K-task state whose patch owns BatchNorm statistics.
      images: images per task; a task with fewer uses all of its own.
      seed: the key of the training-mode forward passes (dropout only; statistics are taken
        before the head).

    Returns:
      The state with ``batch_stats`` replaced for the patch's statistics (shapes unchanged).
    """
    limit = int(s.config.stats_images if images is None else images)
    if limit < 1:
        raise ValueError(f"config.stats_images={limit} must be at least 1")
    patch_stats = state.layout.patch_stat_paths()
    if not patch_stats:
        return state
    model = s.model.clone(num_classes=state.layout.max_classes)
    stats_step = make_stats_step(model)
    groups = resolution_groups(state.layout)
    pre = s.base.preprocessing
    batch_size = int(s.config.eval_batch_size)  # Splits over the mesh, as evaluations do.
    iterators = [
        kdata.eval_batches(
            t.train.take(limit), resolution=t.task.resolution, mean=pre.mean, std=pre.std,
            batch_size=batch_size, crop_fraction=s.eval_crop_fraction,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        for t in s.tasks
    ]
    sums: dict[str, np.ndarray] = {}
    counts = np.zeros(len(s.tasks))
    key = jax.random.key(seed)
    previous: list[dict[str, np.ndarray] | None] = [None] * len(s.tasks)
    for b in itertools.count():
        fresh = [next(it, None) for it in iterators]
        if all(x is None for x in fresh):
            break
        # A task whose images are used up repeats its last batch, masked out and weighted 0.
        weights = np.array([0.0 if x is None else float(np.sum(x["mask"])) for x in fresh])
        previous = [p if x is None else x for p, x in zip(previous, fresh)]
        if any(p is None for p in previous):
            raise ValueError("a task has no training images for its BatchNorm statistics")
        # The padding of a last batch is masked: each real image counts once (make_stats_step).
        batches = [{"images": x["images"], "mask": x["mask"] & (w > 0)}
                   for x, w in zip(previous, weights)]
        out = jax.device_get(stats_step(state, group_batches(batches, groups, s.mesh),
                                        jax.random.fold_in(key, b)))
        for path, value in out.items():
            value = np.asarray(value, np.float64)
            if leaf_name(path) == "var":  # Pooled as E[x^2]: variance plus squared mean.
                value = value + np.asarray(out[_mean_of(path)], np.float64) ** 2
            w = weights.reshape((-1,) + (1,) * (value.ndim - 1))
            sums[path] = sums.get(path, 0.0) + w * value
        counts += weights
    flat = flatten(state.batch_stats)
    new = dict(flat)
    for path in patch_stats:
        c = counts.reshape((-1,) + (1,) * (flat[path].ndim - 1))
        value = sums[path] / c
        if leaf_name(path) == "var":
            mean = sums[_mean_of(path)] / c
            value = np.maximum(value - mean**2, 0.0)
        sharding = getattr(flat[path], "sharding", None)
        value = jnp.asarray(value, flat[path].dtype)
        new[path] = jax.device_put(value, sharding) if sharding is not None else value
    return state.replace(batch_stats=unflatten(new))
