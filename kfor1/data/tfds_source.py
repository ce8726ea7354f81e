"""tensorflow-datasets sources, named ``tfds:NAME`` or ``tfds:NAME:TRAIN:TEST[:VALIDATION]``.

Our splits, 'train', 'test' and (for ``config.validation='split'``) 'validation', map to a
dataset's own split expressions, e.g. ``tfds:oxford_flowers102:train:test:validation`` or
``tfds:dtd:train[:80%]:test:train[80%:]``; without a third expression, 'validation' is the
dataset's own validation split.
Nothing is downloaded here: a dataset that is not prepared is a ``DataError`` saying how to
prepare it, since training machines often have no internet.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds

from kfor1.data._tf import tf
from kfor1.data.decode import decode_example
from kfor1.data.errors import DataError
from kfor1.data.info import DatasetInfo

__all__ = ["TfdsSpec", "load_tfds", "parse_tfds"]

_VERSION = re.compile(r"^\d+\.(\d+|\*)\.(\d+|\*)$")
_FORMS = "tfds:NAME or tfds:NAME:TRAIN_SPLIT:TEST_SPLIT[:VALIDATION_SPLIT]"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A parsed ``tfds:`` source: the builder name and the split expressions (None: default)."""

    name: str
    train_split: str | None = None
    test_split: str | None = None
    validation_split: str | None = None


def _split_colons(text: str) -> list[str]:
    """Splits at ':' outside brackets, so slices like ``train[:80%]`` stay whole."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == ":" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_tfds(rest: str) -> TfdsSpec:
    """Parses what follows ``tfds:``; a version (``NAME:1.2.0``) stays part of the name."""
    parts = _split_colons(rest)
    if len(parts) > 1 and _VERSION.match(parts[1]):
        parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
    if not parts[0] or len(parts) > 4 or not all(parts):
        raise DataError(f"cannot parse source 'tfds:{rest}'; expected {_FORMS}")
    return TfdsSpec(*parts)


def _builder(name: str, data_dir: str | None):
    try:
        return tfds.builder(name, data_dir=data_dir)
    except ValueError as exc:  # DatasetNotFoundError and bad configs are ValueErrors.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"unknown tensorflow-datasets name {name!r} ({first_line}); see "
            "https://www.tensorflow.org/datasets/catalog, or use folder:PATH"
        ) from None


def _not_prepared(name: str, root: str) -> DataError:
    return DataError(
        f"tensorflow-datasets {name!r} is not prepared in {root} and nothing is downloaded "
        f"here: run `tfds build {name} --data_dir={root}` (or tfds.builder({name!r}, "
        f"data_dir={root!r}).download_and_prepare()) on a machine with internet and copy "
        f"{root}/{name} to this machine, or use folder:PATH for images on disk"
    )


def _splits(builder, spec: TfdsSpec, validation: bool = False) -> dict[str, str]:
    """Our split names to the dataset's; 'test' falls back to 'validation' if there is none.
    With ``validation``, 'validation' too (the dataset's own, unless the spec names one)."""
    known = set(builder.info.splits.keys())  # Empty when metadata is absent (e.g. mocked).
    test = spec.test_split
    if test is None:
        test = "test"
        if known and "test" not in known:
            if "validation" not in known:
                raise DataError(
                    f"tensorflow-datasets {spec.name!r} has no 'test' or 'validation' split "
                    f"(it has {', '.join(sorted(known))}); name the splits: "
                    f"tfds:{spec.name}:TRAIN_SPLIT:TEST_SPLIT"
                )
            test = "validation"
    splits = {"train": spec.train_split or "train", "test": test}
    if validation:
        own = spec.validation_split or "validation"
        if own == test or (spec.validation_split is None and known and own not in known):
            raise DataError(
                f"tensorflow-datasets {spec.name!r} has no validation split apart from its test "
                f"split ({test!r}); name one, e.g. tfds:{spec.name}:train[:90%]:{test}:"
                "train[90%:], or hold a fraction of train out (config.validation=0.1)")
        splits["validation"] = own
    return splits


def _read(builder, spec: TfdsSpec, tfds_split: str) -> tf.data.Dataset:
    features = builder.info.features
    decoders = (
        {"image": tfds.decode.SkipDecoding()}
        if isinstance(features["image"], tfds.features.Image)
        else None
    )
    try:
        return builder.as_dataset(split=tfds_split, shuffle_files=False, decoders=decoders)
    except AssertionError as exc:  # tfds asserts that the data exists.
        if "could not find data" in str(exc):
            raise _not_prepared(builder.name, str(builder.data_dir_root)) from None
        raise
    except (ValueError, KeyError) as exc:
        known = ", ".join(sorted(builder.info.splits.keys())) or "unknown"
        raise DataError(
            f"tensorflow-datasets {spec.name!r} has no split {tfds_split!r} ({exc}); "
            f"its splits: {known}; name them as tfds:{spec.name}:TRAIN_SPLIT:TEST_SPLIT"
        ) from None


def _num_examples(builder, spec: TfdsSpec, tfds_split: str) -> int:
    try:
        return int(builder.info.splits[tfds_split].num_examples)
    except (KeyError, ValueError):  # No split metadata: ask the dataset (cheap when mocked).
        return int(_read(builder, spec, tfds_split).cardinality().numpy())


def load_tfds(
    rest: str, split: str, *, name: str, data_dir: str | None = None, decode: bool = True
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """A prepared tensorflow-datasets split as ``{"image", "label"}`` examples.

    With ``decode=False`` the image stays encoded bytes, so shuffling moves bytes, not pixels.
    """
    spec = parse_tfds(rest)
    builder = _builder(spec.name, data_dir)
    features = builder.info.features
    label = dict(features.items()).get("label")
    if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
        raise DataError(
            f"tensorflow-datasets {spec.name!r} has no 'image' feature with a class 'label' "
            f"(features: {', '.join(features.keys())}); only image classification is supported"
        )
    splits = _splits(builder, spec, validation=split == "validation")
    ds = _read(builder, spec, splits[split])
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    if decode:
        ds = ds.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE)
    info = DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        class_names=tuple(label.names),
        num_examples={ours: _num_examples(builder, spec, sp) for ours, sp in splits.items()},
    )
    return ds, info
