"""A training split decoded once and kept in memory, at the size its crops need.

Why: a training stream decodes every image again in every epoch. For a split that fits in
memory (CIFAR-sized data, or a few thousand photos at a CPU-sized resolution) the decoded
pixels can be kept instead, and later epochs only crop, flip and normalise. Images are kept
as uint8 with the shorter side at most ``2 * resolution`` (never enlarged): a random-resized
crop of a quarter of the area then still has ``resolution`` pixels a side, so crops are
resampled from as many pixels as they use. An image larger than that is shrunk once, so a
cached run's views differ from an uncached run's by that resampling (and its exact resume
needs the same ``config.cache_images``).

Example:
  >>> ds, info = kfor1.data.load_source("folder:data/pets", "train", decode=False)
  >>> estimate_bytes(ds, resolution=128)  # from the first 64 images, for the whole split
  91750400
  >>> cached = decoded_cache(ds, resolution=128)  # filled in the first pass, reused after
"""

from __future__ import annotations

import os

import numpy as np

from kfor1.data._tf import tf
from kfor1.data.decode import decode_all

__all__ = ["available_memory", "decoded_cache", "estimate_bytes", "shrink"]

# Examples decoded to estimate a split's cached size.
SAMPLE = 64


def shrink(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """uint8 ``image`` (H, W, 3) with its shorter side at most ``2 * resolution`` (antialiased
    bicubic, aspect kept; smaller images are returned as they are)."""
    shape = tf.shape(image)[:2]
    short = tf.reduce_min(shape)
    limit = 2 * resolution

    def smaller():
        scale = tf.cast(limit, tf.float32) / tf.cast(short, tf.float32)
        size = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), limit)
        resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic",
                                  antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

    return tf.cond(short > limit, smaller, lambda: tf.cast(image, tf.uint8))


def _decoded_and_shrunk(ds: tf.data.Dataset, resolution: int) -> tf.data.Dataset:
    return decode_all(ds).map(lambda e: {**e, "image": shrink(e["image"], resolution)},
                              num_parallel_calls=tf.data.AUTOTUNE)


def decoded_cache(ds: tf.data.Dataset, resolution: int) -> tf.data.Dataset:
    """``ds`` (examples decoded or not) decoded, shrunk (``shrink``) and cached in memory.

    Args:
      ds: a split as ``load_source`` gives it, ``{"image", "label"}`` examples.
      resolution: the task's training resolution.

    Returns:
      A dataset of decoded examples, uint8 images (H, W, 3) with min(H, W) <= 2 * resolution,
      in ``ds``'s order; undecodable examples are skipped with a logged warning. The first full
      pass fills the cache; shuffle and repeat it afterwards.
    """
    return _decoded_and_shrunk(ds, resolution).cache()


def estimate_bytes(
    ds: tf.data.Dataset, resolution: int, count: int | None = None, sample: int = SAMPLE
) -> int:
    """The memory ``decoded_cache`` would take for ``ds``, from its first ``sample`` images.

    Args:
      ds: the split (decoded or not).
      resolution: the task's training resolution.
      count: the split's number of examples; None: ``ds``'s cardinality.
      sample: how many images to decode for the estimate.

    Returns:
      Bytes: the sample's mean cached image size times the split's size (0 for an empty split;
      the sample's total when neither ``count`` nor the cardinality is known).
    """
    sizes = [int(np.prod(e["image"].shape))
             for e in _decoded_and_shrunk(ds.take(sample), resolution).as_numpy_iterator()]
    if not sizes:
        return 0
    total = int(ds.cardinality()) if count is None else int(count)
    return int(np.mean(sizes) * total) if total >= 0 else int(np.sum(sizes))


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux, else the free
    pages; 0 where neither is known)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
