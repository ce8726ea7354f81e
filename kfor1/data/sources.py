"""Data sources named by one string, so configs and the command line can pick any of them.

- ``tfds:NAME`` or ``tfds:NAME:TRAIN_SPLIT:TEST_SPLIT``: a prepared tensorflow-datasets dataset;
- ``folder:PATH``: images in ``PATH/{train,test}/<class_name>/*.jpg``;
- ``digits``: scikit-learn's 8x8 handwritten digits (no download).

Every source yields ``{"image": uint8 (H, W, 3), "label": int64}`` and has the splits 'train'
and 'test'; folders (``val/``) and tfds datasets may have a 'validation' split too.
"""

from __future__ import annotations

from kfor1.data._tf import tf
from kfor1.data.digits import load_digits_source
from kfor1.data.errors import DataError
from kfor1.data.folder import SPLITS, check_classes, load_folder, validate_folder
from kfor1.data.info import DatasetInfo
from kfor1.data.tfds_source import load_tfds

__all__ = ["SOURCE_FORMS", "DataError", "DatasetInfo", "load_source", "validate_folder"]

SOURCE_FORMS = ("tfds:NAME", "tfds:NAME:TRAIN_SPLIT:TEST_SPLIT[:VALIDATION_SPLIT]",
                "folder:PATH", "digits")


def load_source(
    source: str,
    split: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    check_images: bool = True,
    skip_bad_images: bool = False,
    decode: bool = True,
    class_names: tuple[str, ...] | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """The ``split`` ('train', 'test' or 'validation') of ``source`` and what it holds.

    ``data_dir`` is the tensorflow-datasets directory (None: its default). ``seed`` fixes the
    order of a folder's train files. ``check_images`` decodes a folder split once up front and
    raises ``DataError`` for bad files (~1 s per 25,000 small JPEGs), or with
    ``skip_bad_images`` leaves them out and lists them in ``DatasetInfo.skipped``.

    ``decode=False`` keeps images undecoded (folder: ``{"path", "label"}``; tfds: encoded bytes
    in ``"image"``); ``train_batches`` and ``eval_batches`` decode them after shuffling and
    skipping, which keeps the shuffle buffer small and resuming fast. Prefer it for training.

    ``class_names`` pins the classes (those of a trained run, for evaluating it): a source whose
    classes differ is a ``DataError``, and a folder source then reads only ``split``.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    kind, sep, rest = source.partition(":")
    if kind == "folder" and sep and rest:
        return load_folder(rest, split, name=source, seed=seed, check_images=check_images,
                           skip_bad_images=skip_bad_images, decode=decode, class_names=class_names)
    if kind == "tfds" and sep:
        ds, info = load_tfds(rest, split, name=source, data_dir=data_dir, decode=decode)
    elif source == "digits":
        ds, info = load_digits_source(split, name=source)
    else:
        raise DataError(f"unknown data source {source!r}; use one of: {', '.join(SOURCE_FORMS)}")
    if class_names is not None:
        check_classes(info.class_names, tuple(class_names), where=source, short=split,
                      against="the run's classes", noun="classes",
                      fix="evaluate on the data the run was trained on")
    return ds, info
