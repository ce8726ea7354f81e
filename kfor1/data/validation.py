"""A validation split held out of a task's train split: what model selection and periodic
evaluation read, so that the test split is touched only by a run's final evaluation.

The hold-out is stratified (each class gives the same fraction of its examples, at least one,
and keeps at least one for training; a class with a single example is an error, since the
validation split could not measure it) and seeded, so a run and its resume, and every run of
a sweep with the same seed, hold out the same examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kfor1.data._tf import tf
from kfor1.data.errors import DataError

__all__ = ["SPLIT", "parse_validation", "hold_out"]


SPLIT = "split"  # config.validation: the source's own validation split (a folder's val/).


def parse_validation(value: str | float) -> float | str:
    """``config.validation``: '' or 0 -> 0.0 (none), '0.1' -> 0.1 (a fraction of train held
    out), 'split' -> 'split' (the source's own validation split: a folder's ``val/``, a tfds
    dataset's validation split); anything else is a ``DataError`` that says what is
    accepted."""
    if value in ("", None):
        return 0.0
    if value == SPLIT:
        return SPLIT
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if fraction == 0.0:
        return 0.0
    if not 0.0 < fraction < 1.0:
        raise DataError(f"config.validation={value!r}: give the fraction of each task's train "
                        "split to hold out for validation, between 0 and 1 (e.g. 0.1), 'split' "
                        "for the source's own validation split (a folder's val/), or '' for "
                        "none")
    return fraction


def hold_out(
    ds: tf.data.Dataset, fraction: float, seed: int, class_names: Sequence[str] | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, int, int]:
    """Splits ``ds`` (examples with a ``"label"``, decoded or not) into ``(train, validation,
    train_size, validation_size)``.

    Reads the labels once (for undecoded folder or TFDS data: paths or bytes, not pixels).
    Both parts keep ``ds``'s order and have a known cardinality. A class with fewer than two
    examples is a ``DataError`` naming it (``class_names``: the names, by label).
    """
    labels = np.fromiter(
        (int(x) for x in ds.map(lambda ex: ex["label"]).as_numpy_iterator()), np.int64)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    classes, counts = np.unique(labels, return_counts=True)
    single = [int(c) for c, n in zip(classes, counts) if n < 2]
    if single:
        name = class_names[single[0]] if class_names is not None else f"label {single[0]}"
        raise DataError(
            f"class {name!r} has a single training example ({len(single)} such class"
            f"{'es' if len(single) > 1 else ''}): a validation split would have none of it; "
            "add examples of it, or set config.validation='' (no validation split)")
    for c in classes:
        members = np.flatnonzero(labels == c)
        n = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held[rng.permutation(members)[:n]] = True
    table = tf.constant(held)
    keyed = ds.enumerate()

    def part(want: bool, size: int) -> tf.data.Dataset:
        picked = keyed.filter(lambda i, ex: tf.equal(tf.gather(table, i), want))
        return picked.map(lambda i, ex: ex).apply(tf.data.experimental.assert_cardinality(size))

    n_val = int(held.sum())
    return part(False, len(labels) - n_val), part(True, n_val), len(labels) - n_val, n_val
