"""Top-k ImageNet-style predictions for image files, the library side of ``kfor1 predict``.

All images go through one jitted forward pass in fixed-size batches (the last one padded), so a
call compiles once whatever the number of images, and repeated calls with the same model and
batch shape reuse the compiled function.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from kfor1.images import center_crop_resize, load_image
from kfor1.models.pretrained import Pretrained
from kfor1.models.registry import Preprocessing

__all__ = ["Prediction", "load_batch", "top_k"]


class Prediction(NamedTuple):
    """One ranked class for one image."""

    class_index: int
    class_name: str
    probability: float


@functools.partial(jax.jit, static_argnames=("model", "preprocessing"))
def _probabilities(
    model: nn.Module, preprocessing: Preprocessing, variables: Any, images: jax.Array
) -> jax.Array:
    # Model and preprocessing are static (hashable, frozen); the weights are an argument so
    # they are not baked into the compiled program as constants.
    logits = model.apply(variables, preprocessing.normalize(images))
    return jax.nn.softmax(logits, axis=-1)


def load_batch(paths: Sequence[str | os.PathLike], preprocessing: Preprocessing) -> np.ndarray:
    """Decodes and centre-crops image files into a ``uint8`` NHWC batch for ``preprocessing``."""
    return np.stack([
        center_crop_resize(load_image(p), preprocessing.resolution, preprocessing.crop_fraction)
        for p in paths
    ])


def top_k(
    pretrained: Pretrained,
    images: Sequence[str | os.PathLike],
    k: int = 5,
    batch_size: int = 32,
) -> list[list[Prediction]]:
    """The ``k`` most probable classes of each image file, most probable first.

    Returns one list per image of ``(class_index, class_name, probability)`` tuples. Missing
    files are reported before any decoding or compilation; undecodable ones raise
    ``kfor1.images.ImageReadError``.
    """
    num_classes = len(pretrained.class_names)
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and {num_classes}, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    paths = [os.fspath(p) for p in images]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such image file: {path}")
    if not paths:
        return []

    batch = min(batch_size, len(paths))
    results: list[list[Prediction]] = []
    for start in range(0, len(paths), batch):
        chunk = load_batch(paths[start : start + batch], pretrained.preprocessing)
        count = len(chunk)
        if count < batch:  # Pad to the compiled batch size rather than compile a second shape.
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), np.uint8)])
        probs = np.asarray(
            _probabilities(pretrained.model, pretrained.preprocessing, pretrained.variables, chunk)
        )[:count]
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        for row, indices in zip(probs, order):
            results.append([
                Prediction(int(i), pretrained.class_names[i], float(row[i])) for i in indices
            ])
    return results
