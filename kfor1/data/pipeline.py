"""Batches for training and evaluation, as numpy arrays ready for a jitted step.

Training streams are infinite, shuffled and augmented reproducibly: shuffling uses the run seed,
and each example's augmentation is seeded by (seed, example number), so a run restarted with
``start_step`` sees exactly the batches it would have seen. Evaluation is one pass whose last
batch is padded and masked, so every batch has one shape and metrics count real examples only.
Each process reads its own shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from kfor1.data._tf import tf
from kfor1.data.cache import decoded_cache
from kfor1.data.decode import decode_all
from kfor1.data.errors import DataError
from kfor1.data.transforms import Augment, augment_image, eval_image, normalize

__all__ = ["Augment", "eval_batches", "multitask_train_batches", "stack_tasks", "train_batches"]

Batch = dict[str, np.ndarray]
_AUTOTUNE = tf.data.AUTOTUNE


def _check_args(resolution, batch_size, mean, std, process_index, process_count) -> None:
    if resolution <= 0 or batch_size <= 0:
        raise ValueError(f"resolution and batch_size must be positive: {resolution}, {batch_size}")
    for name, value in (("mean", mean), ("std", std)):
        if np.size(value) not in (1, 3):
            raise ValueError(f"{name} must be one value or one per RGB channel, got {value}")
    if np.any(np.asarray(std) <= 0):
        raise ValueError(f"std must be positive, got {std}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count: {process_index}, {process_count}"
        )


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options)


def train_batches(
    ds: tf.data.Dataset,
    *,
    resolution: int,
    mean: Sequence[float] | float,
    std: Sequence[float] | float,
    batch_size: int,
    seed: int,
    augment: Augment,
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
    process_index: int = 0,
    process_count: int = 1,
    cache: bool = False,
) -> Iterator[Batch]:
    """Infinite training batches: ``images`` float32 (B, res, res, 3), ``labels`` int32 (B,).

    ``ds`` yields examples as ``load_source`` gives them, decoded or not (undecoded is cheaper:
    shuffling and the ``start_step`` skip then move paths or bytes, not pixels). Images are
    normalised as (x - mean) / std in 0..255 units. The stream depends only on ``seed`` and the
    data; ``start_step`` resumes it at that batch. Examples that fail to decode are skipped with
    a warning (which shifts later batches, so resumes are exact only for clean data).

    With ``process_count`` > 1, ``batch_size`` is this process's part: process ``p`` yields
    rows ``[p * batch_size, (p + 1) * batch_size)`` of the batches a single process would
    yield with ``batch_size * process_count``.

    ``cache`` decodes the split once and keeps it in memory (``kfor1.data.cache``: uint8, the
    shorter side at most twice ``resolution``); shuffling, the resume skip and augmentation then
    work on pixels, and only the first epoch decodes. Each process then caches the whole split.
    """
    _check_args(resolution, batch_size, mean, std, process_index, process_count)
    if start_step < 0 or shuffle_buffer <= 0:
        raise ValueError(
            f"need start_step >= 0 and shuffle_buffer > 0: {start_step}, {shuffle_buffer}"
        )
    if int(ds.cardinality()) == 0:
        raise DataError("no training examples")
    if cache:
        ds = decoded_cache(ds, resolution)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Number examples before the skip, so each keeps its augmentation seed across resumes.
    ds = ds.enumerate().skip(start_step * batch_size * process_count)
    if process_count > 1 and cache:
        # Decoded images differ in size, so rows are picked one by one: example j of the
        # stream is row j mod (B * P) of its global batch, this process's when j // B is p mod P.
        ds = ds.filter(lambda index, _: (index // batch_size) % process_count == process_index)
    elif process_count > 1:
        # Every process walks the same (undecoded, cheap) stream and decodes only its rows of
        # each global batch: the global batches, and so the run, do not depend on how many
        # processes feed them.
        rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        ds = ds.batch(batch_size * process_count, drop_remainder=True).map(
            lambda index, example: (index[rows], {k: v[rows] for k, v in example.items()})
        ).unbatch()
    if not cache:
        ds = decode_all(ds)

    def prepare(index, example):
        image_seed = tf.stack([tf.constant(seed, tf.int64), index])
        view = augment_image(example["image"], image_seed, resolution, augment)
        return {
            "images": normalize(view, mean, std),
            "labels": tf.cast(example["label"], tf.int32),
        }

    ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)
    return _options(ds).as_numpy_iterator()


def eval_batches(
    ds: tf.data.Dataset,
    *,
    resolution: int,
    mean: Sequence[float] | float,
    std: Sequence[float] | float,
    batch_size: int,
    crop_fraction: float = 0.875,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """One pass in order: ``images``, ``labels`` and ``mask`` bool (B,) marking real examples.

    Images get the evaluation crop (shorter side to resolution / crop_fraction, centre square).
    The last batch is padded to ``batch_size``. When ``ds`` has a known size, every process
    yields the same number of batches (adding fully masked ones), so collective steps match.
    """
    _check_args(resolution, batch_size, mean, std, process_index, process_count)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    total = int(ds.cardinality())
    ds = decode_all(ds.shard(process_count, process_index))

    def prepare(example):
        view = eval_image(example["image"], resolution, crop_fraction)
        return {
            "images": normalize(view, mean, std),
            "labels": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(True),
        }

    def pad(batch):
        missing = batch_size - tf.shape(batch["labels"])[0]
        return {
            key: tf.pad(value, [[0, missing]] + [[0, 0]] * (value.shape.rank - 1))
            for key, value in batch.items()
        }

    ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE).batch(batch_size).map(pad)
    if total >= 0:
        num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
        empty = {
            "images": tf.zeros([batch_size, resolution, resolution, 3], tf.float32),
            "labels": tf.zeros([batch_size], tf.int32),
            "mask": tf.zeros([batch_size], tf.bool),
        }
        filler = tf.data.Dataset.from_tensors(empty).repeat()
        ds = ds.concatenate(filler).take(num_batches)
    return _options(ds.prefetch(_AUTOTUNE)).as_numpy_iterator()


def stack_tasks(batches: Sequence[Batch]) -> Batch:
    """K per-task batches to one batch of (K, B, ...) arrays, the multi-task step's input.

    Tasks must share batch size and resolution; group tasks of other resolutions separately.
    """
    if not batches:
        raise ValueError("stack_tasks needs at least one task batch")
    keys = set(batches[0])
    for k, batch in enumerate(batches):
        if set(batch) != keys:
            raise ValueError(f"task {k} batch has keys {sorted(batch)}, task 0 has {sorted(keys)}")
    stacked = {}
    for key in sorted(keys):
        shapes = {np.shape(batch[key]) for batch in batches}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack {key!r} of shapes {sorted(shapes)}; tasks of "
                "different resolutions or batch sizes need separate groups"
            )
        stacked[key] = np.stack([batch[key] for batch in batches])
    return stacked


def multitask_train_batches(per_task_iterators: Iterable[Iterator[Batch]]) -> Iterator[Batch]:
    """Zips K per-task batch streams into one stream of stacked (K, B, ...) batches."""
    for batches in zip(*per_task_iterators):
        yield stack_tasks(batches)
