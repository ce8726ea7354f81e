"""scikit-learn's handwritten digits: a tiny real dataset that needs no download.

1,797 8x8 grayscale images (values 0..16), split once, stratified 80/20 with a fixed seed, so
that 'train' and 'test' are the same on every machine.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kfor1.data._tf import tf
from kfor1.data.errors import DataError
from kfor1.data.info import DatasetInfo

__all__ = ["digits_arrays", "load_digits_source"]

CLASS_NAMES = tuple(str(d) for d in range(10))


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: uint8 RGB images (N, 8, 8, 3) scaled to 0..255 and int64 labels (N,)."""
    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def load_digits_source(split: str, *, name: str) -> tuple[tf.data.Dataset, DatasetInfo]:
    """The digits split as ``{"image", "label"}`` examples (already pixels: nothing to decode)."""
    if split == "validation":
        raise DataError("the digits source has no validation split of its own "
                        "(config.validation='split'); hold a fraction of train out instead, "
                        "e.g. config.validation=0.1")
    arrays = digits_arrays()
    images, labels = arrays[split]
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    info = DatasetInfo(
        name=name,
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        num_examples={s: len(a[1]) for s, a in arrays.items()},
    )
    return ds, info
