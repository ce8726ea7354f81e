"""Turns stored images into uint8 RGB pixels, in one place for every source and pipeline.

Sources can hand out examples undecoded (file paths, encoded bytes) so that shuffling and the
resume ``skip`` in the input pipeline move small strings rather than pixels; decoding then
happens here, as late as possible.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kfor1.data._tf import tf
from kfor1.data.errors import DataError
from kfor1.images import decode_bytes

__all__ = ["decode_all", "decode_example", "decode_image"]


def _decode_bytes(data: bytes | np.ndarray) -> np.ndarray:
    # tf.numpy_function hands a scalar string over as bytes in graphs, as a 0-d object array
    # eagerly.
    return decode_bytes(data.item() if isinstance(data, np.ndarray) else bytes(data))


def decode_image(image: tf.Tensor) -> tf.Tensor:
    """``uint8`` (H, W, 3) from encoded bytes (JPEG, PNG, BMP, GIF, WebP) or uint8 pixels.

    Encoded images decode by ``kfor1.images.decode_bytes``, the rule ``kfor1 predict`` uses
    too (EXIF orientation applied, transparency over white), so a model sees a file the same
    way in training and in serving. Pixel arrays: grayscale becomes RGB by repeating the
    channel; an alpha channel is dropped.
    """
    if image.dtype == tf.string:
        pixels = tf.numpy_function(_decode_bytes, [image], tf.uint8, stateful=False)
        pixels.set_shape([None, None, 3])
        return pixels
    if image.dtype != tf.uint8:
        raise DataError(f"images must be uint8 pixels or encoded bytes, got {image.dtype.name}")
    if image.shape.rank != 3:
        raise DataError(f"images must have shape (height, width, channels), got {image.shape}")
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels is not None and channels > 3:
        return image[..., :3]
    pixels = tf.cond(
        tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image[..., :3]
    )
    pixels.set_shape([None, None, 3])
    return pixels


def decode_example(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """``{"image": uint8 (H, W, 3), "label": int64}`` from any form a source yields.

    Accepts ``{"path", "label"}`` (an image file to read), ``{"image": bytes, "label"}`` or
    ``{"image": uint8 pixels, "label"}``.
    """
    if "path" in example:
        image = decode_image(tf.io.read_file(example["path"]))
    else:
        image = decode_image(example["image"])
    return {"image": image, "label": tf.cast(example["label"], tf.int64)}


def decode_all(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds``'s examples decoded in parallel (``decode_example``); examples that fail to decode
    are skipped with a logged warning. Elements may also be ``(example number, example)``."""

    def decode(*element):
        *number, example = element
        return (*number, decode_example(example)) if number else decode_example(example)

    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
