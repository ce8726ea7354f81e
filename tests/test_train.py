"""The training loop end to end: what a run writes, resuming after an interruption, stopping
on divergence, and config mistakes caught before any training.

Read as a specification of ``kfor1.trainer.loop`` (the runs are ``tiny_runs``'s).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_runs import metrics, run_config, write_folder

from kfor1.errors import TrainingError
from kfor1.files.patchfile import load_patch
from kfor1.trainer.checkpoint import Checkpointer
from kfor1.trainer.config import task
from kfor1.trainer.loop import train


def test_workdir_holds_metrics_events_checkpoints_patches_and_summary(trained_run):
    workdir, summary = trained_run
    lines = metrics(workdir)
    train_lines = [line for line in lines if "train/loss/digits" in line]
    assert [line["step"] for line in train_lines] == [2, 4, 6]
    assert {"lr/scale_bias", "lr/logits", "train/accuracy/colours"} <= set(train_lines[0])
    assert "eval/accuracy/digits" in lines[-1] and "eval/accuracy/colours" in lines[-1]
    assert list(workdir.glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 6]
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for name, classes in (("digits", 10), ("colours", 3)):
        t = summary["tasks"][name]
        assert t["num_classes"] == classes
        assert 0.0 <= t["accuracy"] <= 1.0 and t["examples"] > 0
        patch = load_patch(workdir / "patches" / name)
        assert patch.num_classes == classes
        assert t["patch_file_bytes"] == sum(
            f.stat().st_size for f in (workdir / "patches" / name).iterdir()
        )
        assert patch.meta["spec"] == "scale_bias+logits"
        assert patch.meta["base"]["model"] == "efficientnet_lite0"
    assert json.loads((workdir / "patches" / "colours" / "patch.json").read_text())[
        "class_names"] == ["blue", "green", "red"]
    tasks = json.loads((workdir / "tasks.json").read_text())
    assert [(t["name"], len(t["class_names"]), t["resolution"]) for t in tasks] == [
        ("digits", 10, 32), ("colours", 3, 32)]


def test_interrupted_run_resumes_to_the_same_metrics_and_parameters(colours, trained_run,
                                                                     tmp_path):
    reference, _ = trained_run
    config = run_config(colours)
    assert train(config, str(tmp_path), stop_at_step=3) == {"stopped_at_step": 3}
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    train(config, str(tmp_path))
    assert metrics(tmp_path) == metrics(reference)
    for name in ("digits", "colours"):
        a = load_patch(reference / "patches" / name).variables
        b = load_patch(tmp_path / "patches" / name).variables
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nan_loss_stops_with_advice_and_keeps_the_last_checkpoint(colours, tmp_path):
    config = run_config(colours, num_steps=6, optimizer="sgd")
    config.tasks = [task("digits", resolution=32)]
    train(config, str(tmp_path), stop_at_step=2)
    config.learning_rate.scale_bias = 1e30  # SGD diverges to inf, then NaN.
    config.learning_rate.logits = 1e30
    with pytest.raises(TrainingError, match=r"(NaN/inf|diverged).*lower config.learning_rate.*"
                       r"resumes from step 2"):
        train(config, str(tmp_path))
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch": "scale_bais"}, "unknown patch preset"),
        ({"optimizer": "adagrad"}, "use one of adamw, adam, sgd"),
        ({"schedule": "step"}, "use one of cosine, constant, onecycle"),
        ({"num_steps": 0}, "is out of range: use an integer >= 1"),
        ({"task_chunk": -2}, r"use an integer: 0 \(auto\), -1 \(all tasks at once\)"),
        ({"batch_size": 3, "mesh.tasks": 4, "mesh.data": 2},
         "batch_size=3 does not split over the mesh's 2-way"),
    ],
)
def test_bad_config_values_name_the_fix_before_anything_is_written(colours, tmp_path,
                                                                    overrides, message):
    config = run_config(colours)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_resuming_with_an_incompatible_config_says_so(colours, tmp_path):
    config = run_config(colours, num_steps=4)
    config.tasks = [task("digits", resolution=32)]
    train(config, str(tmp_path), stop_at_step=2)
    config.optimizer = "sgd"
    with pytest.raises(ValueError, match="new --workdir"):
        train(config, str(tmp_path))


def test_missing_dataset_folder_names_the_expected_layout(tmp_path):
    config = run_config(tmp_path)
    config.tasks = [task(f"folder:{tmp_path / 'nope'}")]
    with pytest.raises(ValueError, match="no such dataset folder"):
        train(config, str(tmp_path / "run"))


def test_corrupt_image_files_are_named_before_training(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    config = run_config(root)
    config.tasks = [task(f"folder:{root}", resolution=32)]
    with pytest.raises(ValueError, match="broken.jpg"):
        train(config, str(tmp_path / "run"))
    checkpoints = Path(tmp_path / "run" / "checkpoints")
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_class_mismatch_between_splits_is_an_error(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    (root / "test" / "blue").rename(root / "test" / "cyan")
    config = run_config(root)
    config.tasks = [task(f"folder:{root}", resolution=32)]
    with pytest.raises(ValueError, match="cyan|blue"):
        train(config, str(tmp_path / "run"))


def test_a_config_with_patch_rules_trains_and_exports_them(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    config = run_config(root, num_steps=2, log_every=1, checkpoint_every=2)
    config.tasks = [task(f"folder:{root}", name="colours", resolution=32)]
    config.patch_rules = [("head/.*", "patch:logits"),
                          (".*/depthwise/conv/kernel", "patch:depthwise"), (".*", "shared")]
    summary = train(config, str(tmp_path / "run"))
    patch = load_patch(tmp_path / "run" / "patches" / "colours")
    assert patch.meta["spec"] == [list(r) for r in config.patch_rules]
    leaves = sorted(jax.tree_util.keystr(p) for p, _ in
                    jax.tree_util.tree_flatten_with_path(patch.variables["params"])[0])
    assert leaves and all("depthwise" in p or "head" in p for p in leaves)
    assert summary["patch"] == patch.meta["spec"] and summary["tasks"]["colours"]["examples"] == 6


def test_keep_best_exports_each_tasks_patch_from_its_best_validation(colours, tmp_path,
                                                                      monkeypatch):
    """Issue 36: ``config.keep_best`` exports each task's patch from the evaluation with its
    best validation accuracy (per task: digits peaks at step 4, colours at step 2 here, by the
    scripted accuracies), and summary.json says which step each patch came from."""
    import kfor1.trainer.loop as loop

    scripted = [{"digits": 0.5, "colours": 0.9}, {"digits": 0.7, "colours": 0.8},
                {"digits": 0.6, "colours": 0.7}]
    real = loop.evaluate

    def evaluate(s, state, eval_step=None, split="test"):
        results = real(s, state, eval_step, split)
        if split == "validation" and scripted:
            for name, accuracy in scripted.pop(0).items():
                results[name] = {**results[name], "accuracy": accuracy}
        return results

    monkeypatch.setattr(loop, "evaluate", evaluate)
    workdir = tmp_path / "run"
    summary = train(run_config(colours, validation="0.3", eval_every=2, keep_best=True),
                    str(workdir))
    assert not scripted  # Steps 2, 4 and the end were evaluated on validation.
    assert {n: t["patch_step"] for n, t in summary["tasks"].items()} == {
        "digits": 4, "colours": 2}
    best = json.loads((workdir / "best" / "best.json").read_text())
    assert best == {"digits": {"step": 4, "val_accuracy": 0.7},
                    "colours": {"step": 2, "val_accuracy": 0.9}}
    for name in ("digits", "colours"):
        exported = load_patch(workdir / "patches" / name).variables
        kept = load_patch(workdir / "best" / name).variables
        jax.tree.map(np.testing.assert_array_equal, exported, kept)
        # What summary.json reports is the exported patch's, measured again: not scripted.
        assert summary["tasks"][name]["val_accuracy"] not in (0.7, 0.9)
    final = train(run_config(colours, validation="0.3", eval_every=2), str(tmp_path / "last"))
    last = load_patch(tmp_path / "last" / "patches" / "digits").variables
    with pytest.raises(AssertionError):  # Without keep_best: the last step's patch.
        jax.tree.map(np.testing.assert_array_equal, last,
                     load_patch(workdir / "patches" / "digits").variables)
    assert "patch_step" not in final["tasks"]["digits"]


@pytest.mark.parametrize("overrides, fragment", [
    ({"validation": ""}, "set config.validation"),
    ({"validation": "0.3", "eval_every": 0}, "config.eval_every"),
    ({"validation": "0.3", "eval_every": 2, "train_shared": True}, "config.train_shared"),
])
def test_keep_best_without_what_it_chooses_from_is_refused(colours, overrides, fragment):
    from kfor1.trainer.config import ConfigError
    from kfor1.trainer.experiment import check_values

    with pytest.raises(ConfigError, match=fragment):
        check_values(run_config(colours, keep_best=True, **overrides))


@pytest.mark.parametrize("text", ['[1, 2]', '{"digits": {"step": "x"}}', '{"digits": 3}',
                                  '{"digits": {"val_accuracy": 0.5}}', "[" * 100 + "]" * 100])
def test_a_hostile_best_record_is_one_line(colours, tmp_path, text):
    """``best/best.json`` is read as untrusted input: wrong types, missing fields and deep
    nesting are one error naming the file, before any training."""
    from kfor1.trainer.best import BestPatches
    from kfor1.trainer.experiment import setup
    from kfor1.trainer.workdir import Workdir
    from kfor1.untrusted import UntrustedFileError

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(text)
    s = setup(run_config(colours, validation="0.3", eval_every=2, keep_best=True), train=False)
    with pytest.raises(UntrustedFileError, match="best.json") as excinfo:
        BestPatches(s, Workdir(str(tmp_path)))
    assert "\n" not in str(excinfo.value)
