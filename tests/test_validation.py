"""A validation split held out of train (``config.validation``): stratified and seeded, read by
the periodic evaluations, with the test split read only by the final one; ``metrics.jsonl``
and ``summary.json`` say which split each accuracy comes from. Read as a specification of
``kfor1.data.validation`` and its use in ``kfor1.trainer.loop``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from tiny_runs import run_config

from kfor1.data import DataError, hold_out, parse_validation
from kfor1.trainer import evaluate as evaluate_module
from kfor1.trainer import loop as train_module
from kfor1.trainer.experiment import check_values


def _labelled(labels):
    return tf.data.Dataset.from_tensor_slices(
        {"label": np.asarray(labels, np.int64), "id": np.arange(len(labels))})


def _ids(ds):
    return [int(x["id"]) for x in ds.as_numpy_iterator()]


def test_hold_out_is_stratified_disjoint_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val, n_train, n_val = hold_out(_labelled(labels), 0.1, seed=0)
    train_ids, val_ids = _ids(train), _ids(val)
    assert (n_train, n_val) == (90, 10) and len(train_ids) == 90 and len(val_ids) == 10
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(100))
    assert np.bincount([labels[i] for i in val_ids]).tolist() == [5, 3, 2]  # Stratified.
    assert int(val.cardinality()) == 10 and int(train.cardinality()) == 90
    assert _ids(hold_out(_labelled(labels), 0.1, seed=0)[1]) == val_ids  # Seeded.
    assert _ids(hold_out(_labelled(labels), 0.1, seed=1)[1]) != val_ids


def test_every_class_with_two_examples_gives_one_and_keeps_one():
    _, val, _, n_val = hold_out(_labelled([0, 0, 1, 1, 1, 2, 2]), 0.01, seed=0)
    assert n_val == 3 and sorted(int(x["label"]) for x in val.as_numpy_iterator()) == [0, 1, 2]


def test_a_class_the_validation_split_would_miss_is_named():
    with pytest.raises(DataError, match="class 'cat' has a single training example .* set "
                       "config.validation=''"):
        hold_out(_labelled([0, 0, 1]), 0.1, seed=0, class_names=["dog", "cat"])


@pytest.mark.parametrize("value", ["1.5", "abc", "-0.1", "1"])
def test_a_validation_that_is_no_fraction_is_refused_before_loading(value, colours):
    assert parse_validation("") == 0.0 and parse_validation("0.25") == 0.25
    with pytest.raises(DataError, match="config.validation"):
        check_values(run_config(colours, validation=value))


def test_periodic_evaluations_read_validation_and_the_test_split_only_the_last(
        colours, tmp_path, monkeypatch):
    read = []
    real = evaluate_module.evaluate

    def recording(s, state, eval_step=None, split="test"):
        read.append((int(state.step), split))
        return real(s, state, eval_step, split=split)

    monkeypatch.setattr(train_module, "evaluate", recording)
    out = train_module.train(run_config(colours, validation="0.25", eval_every=2),
                             str(tmp_path / "run"))
    assert read == [(2, "validation"), (4, "validation"), (6, "test"), (6, "validation")]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_steps = [x["step"] for x in lines if "val/accuracy/colours" in x]
    test_steps = [x["step"] for x in lines if "eval/accuracy/colours" in x]
    assert val_steps == [2, 4, 6] and test_steps == [6]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == out and summary["splits"]["accuracy"] == "test"
    assert summary["splits"]["val_accuracy"].startswith("validation: 0.25 of train")
    for task in ("digits", "colours"):
        assert 0.0 <= summary["tasks"][task]["val_accuracy"] <= 1.0


def test_without_validation_the_summary_says_accuracy_is_on_test(trained_run):
    _, summary = trained_run
    assert summary["splits"] == {"accuracy": "test"}
    assert "val_accuracy" not in summary["tasks"]["colours"]


# ---------------------------------------------------- config.validation='split': the source's own


def _with_val(root, classes=("red", "green", "blue")):
    from tiny_runs import write_folder

    write_folder(root)
    write_folder(root / "_val", classes=classes, per_class=3)
    (root / "_val" / "train").rename(root / "val")
    return root


def test_a_folders_val_split_is_the_validation_split(tmp_path):
    from kfor1.trainer.experiment import setup

    folder = _with_val(tmp_path / "data")
    c = run_config(folder, validation="split")
    c.tasks = [c.tasks[1]]
    (t,) = setup(c).tasks
    assert t.info.num_examples == {"train": 18, "test": 18, "validation": 9}
    labels = sorted(int(x["label"]) for x in t.val.as_numpy_iterator())
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert int(t.train.cardinality()) == 18  # Nothing held out of train.


def test_a_val_split_missing_a_class_is_named(tmp_path):
    from kfor1.trainer.experiment import setup

    folder = _with_val(tmp_path / "data", classes=("red", "green"))
    c = run_config(folder, validation="split")
    c.tasks = [c.tasks[1]]
    with pytest.raises(DataError, match=r"missing in validation: blue; .* needs a folder of "
                       "images for every class of train"):
        setup(c)


def test_sources_without_a_validation_split_say_what_to_do(tmp_path, colours):
    from kfor1.data import load_source

    with pytest.raises(DataError, match="no validation split of its own .* config.validation=0.1"):
        load_source("digits", "validation")
    with pytest.raises(DataError, match="has no val/ folder"):
        load_source(f"folder:{colours}", "validation")
    assert parse_validation("split") == "split"


def test_a_tfds_validation_split_is_named_or_the_datasets_own():
    import tensorflow_datasets as tfds

    from kfor1.data import load_source
    from kfor1.data.tfds_source import parse_tfds

    assert parse_tfds("dtd:train[:80%]:test:train[80%:]").validation_split == "train[80%:]"
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        ds, info = load_source("tfds:oxford_flowers102:train:test:validation", "validation")
        assert info.num_examples["validation"] == 4 and len(list(ds)) == 4
        with pytest.raises(DataError, match="no validation split apart from its test split"):
            load_source("tfds:oxford_flowers102:train:validation:validation", "validation")
