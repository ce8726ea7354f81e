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

from kfor1.images import ImageReadError, center_crop_resize, load_image, read_images
from kfor1.models.pretrained import Pretrained
from kfor1.models.registry import Preprocessing
from kfor1.table import printable

__all__ = ["Prediction", "format_predictions", "format_results", "load_batch", "top_k"]


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
    skip_unreadable: bool = False,
) -> list[list[Prediction] | ImageReadError]:
    """The ``k`` most probable classes of each image file, most probable first.

    Returns one list per image of ``(class_index, class_name, probability)`` tuples. Missing
    files are reported before any decoding or compilation; an undecodable one raises
    ``kfor1.images.ImageReadError`` — or with ``skip_unreadable`` its entry is that error and
    the other images are still classified (one bad file among many should not stop a batch).
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

    pre = pretrained.preprocessing
    batch = min(batch_size, len(paths))
    results: list[list[Prediction] | ImageReadError] = []
    for start in range(0, len(paths), batch):
        decoded, errors = read_images(paths[start : start + batch], pre.resolution,
                                      pre.crop_fraction)
        if errors and not skip_unreadable:
            raise errors[0]
        good = [image for image in decoded if image is not None]
        if not good:
            results.extend(errors)
            continue
        chunk = np.stack(good)
        count = len(chunk)
        if count < batch:  # Pad to the compiled batch size rather than compile a second shape.
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), np.uint8)])
        probs = iter(np.asarray(
            _probabilities(pretrained.model, pre, pretrained.variables, chunk)
        )[:count])
        failed = iter(errors)
        for image in decoded:
            if image is None:
                results.append(next(failed))
                continue
            row = next(probs)
            order = np.argsort(-row, kind="stable")[:k]
            results.append([Prediction(int(i), pretrained.class_names[i], float(row[i]))
                            for i in order])
    return results


def format_predictions(path: str, predictions: Sequence[Prediction]) -> str:
    """The image path, then one aligned row per class: rank, probability, index, name."""
    index_width = max(len(str(p.class_index)) for p in predictions)
    rank_width = len(str(len(predictions)))
    lines = [printable(path)]
    for rank, p in enumerate(predictions, 1):
        lines.append(
            f"  {rank:>{rank_width}}  {100 * p.probability:6.2f}%  "
            f"{p.class_index:>{index_width}}  {printable(p.class_name)}"
        )
    return "\n".join(lines)


def format_results(results: Sequence[dict[str, Any]], tagged: bool = False) -> str:
    """``kfor1 predict``'s table of ``{"path", ["task",] "top": [{"index", "name",
    "probability"}]}`` results (those with an ``"error"`` instead are left out): one
    ``format_predictions`` block per image, headed ``PATH  [TASK]`` when ``tagged``."""
    blocks = []
    for r in results:
        if "error" in r:
            continue
        header = f"{r['path']}  [{r['task']}]" if tagged else r["path"]
        preds = [Prediction(p["index"], p["name"], p["probability"]) for p in r["top"]]
        blocks.append(format_predictions(header, preds))
    return "\n\n".join(blocks)
