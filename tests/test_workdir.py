"""A run's directory: its layout, and eval and export from it without the train split.

Read as a specification of ``kfor1.trainer.workdir``.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from tiny_runs import run_config, write_folder

from kfor1.data import DataError
from kfor1.files.patchfile import load_patch
from kfor1.trainer.config import task
from kfor1.trainer.loop import train
from kfor1.trainer.workdir import (
    Workdir,
    evaluate_workdir,
    export_workdir,
    load_config,
    restore,
)


def test_layout_names_every_file_of_a_run(trained_run):
    workdir, _ = trained_run
    wd = Workdir(str(workdir))
    for path in (wd.config, wd.tasks, wd.metrics, wd.summary, wd.checkpoints,
                 wd.patch("colours")):
        assert (workdir / path).exists(), path
    assert load_config(wd).tasks[1].name == "colours"


def test_eval_restores_the_final_metrics(trained_run):
    workdir, summary = trained_run
    results = evaluate_workdir(str(workdir))
    for name, t in summary["tasks"].items():
        assert results[name]["accuracy"] == pytest.approx(t["accuracy"])
        assert results[name]["examples"] == t["examples"]


def test_eval_and_export_never_read_the_train_split(tmp_path):
    """Train on a folder, delete its train/ folder: eval and export still work."""
    root = write_folder(tmp_path / "data", per_class=3)
    config = run_config(root, num_steps=2, log_every=1, checkpoint_every=2)
    config.tasks = [task(f"folder:{root}", name="colours", resolution=32)]
    summary = train(config, str(tmp_path / "run"))
    shutil.rmtree(root / "train")

    s, _ = restore(str(tmp_path / "run"))
    assert s.tasks[0].train is None and s.tasks[0].info.class_names == ("blue", "green", "red")
    results = evaluate_workdir(str(tmp_path / "run"))
    assert results["colours"]["accuracy"] == pytest.approx(summary["tasks"]["colours"]["accuracy"])
    out = export_workdir(str(tmp_path / "run"), str(tmp_path / "out"))
    exported = load_patch(out["colours"])
    original = load_patch(tmp_path / "run" / "patches" / "colours")
    jax.tree.map(np.testing.assert_array_equal, exported.variables, original.variables)
    assert exported.meta == original.meta


def test_eval_refuses_test_classes_that_differ_from_the_run(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    config = run_config(root, num_steps=1, log_every=1, checkpoint_every=1)
    config.tasks = [task(f"folder:{root}", name="colours", resolution=32)]
    train(config, str(tmp_path / "run"))
    (root / "test" / "blue").rename(root / "test" / "cyan")
    expected = r"run's classes.*missing in test: blue.*only in test: cyan"
    with pytest.raises(DataError, match=expected):
        evaluate_workdir(str(tmp_path / "run"))


def test_a_directory_that_is_no_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*--workdir of a `kfor1 train`"):
        evaluate_workdir(str(tmp_path))


def test_a_hand_edited_task_list_is_refused(trained_run, tmp_path):
    workdir, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    tasks = json.loads((copy / "tasks.json").read_text())
    tasks[0]["name"] = "renamed"
    (copy / "tasks.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match="name different tasks"):
        restore(str(copy))
