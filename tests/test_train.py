"""The trainer end to end: workdir outputs, resume after interruption, patch export, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from kfor1 import train as trainer
from kfor1.checkpoint import Checkpointer
from kfor1.config import base_config, task
from kfor1.multitask import task_variables
from kfor1.patchfile import PatchFileError, apply_patch, load_patch

REPO = Path(__file__).resolve().parents[1]


def _write_folder(root: Path, classes=("red", "green", "blue"), per_class=6) -> Path:
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(
                    np.asarray(colours[name]) + rng.normal(0, 25, (20, 24, 3)), 0, 255
                ).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("colours"))


def _config(folder: Path, **overrides):
    c = base_config()
    c.tasks = [task("digits", resolution=32), task(f"folder:{folder}", name="colours",
                                                   resolution=32)]
    c.num_steps = 6
    c.batch_size = 8
    c.warmup_steps = 2
    c.log_every = 2
    c.checkpoint_every = 2
    c.eval_batch_size = 48
    c.max_eval_examples = 100
    c.progress = False
    c.augment.crop = "pad"
    for key, value in overrides.items():
        c[key] = value
    return c


def _metrics(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = trainer.train(_config(folder), str(workdir))
    return workdir, summary


def test_workdir_holds_metrics_events_checkpoints_patches_and_summary(uninterrupted):
    workdir, summary = uninterrupted
    lines = _metrics(workdir)
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


def test_interrupted_run_resumes_to_the_same_metrics_and_parameters(folder, uninterrupted,
                                                                     tmp_path):
    reference, _ = uninterrupted
    config = _config(folder)
    assert trainer.train(config, str(tmp_path), stop_at_step=3) == {"stopped_at_step": 3}
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    trainer.train(config, str(tmp_path))
    assert _metrics(tmp_path) == _metrics(reference)
    for name in ("digits", "colours"):
        a = load_patch(reference / "patches" / name).variables
        b = load_patch(tmp_path / "patches" / name).variables
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_exported_patch_on_its_base_gives_bitwise_identical_logits(folder, uninterrupted):
    workdir, _ = uninterrupted
    config = _config(folder)
    s = trainer.setup(config)
    state = Checkpointer(workdir / "checkpoints").restore(trainer.init_state(s))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    for k, name in enumerate(("digits", "colours")):
        trained = task_variables(state, k)
        patch = load_patch(workdir / "patches" / name)
        patched = apply_patch(s.base.variables, patch)
        model = s.model.clone(num_classes=patch.num_classes)
        apply = jax.jit(lambda v, x, model=model: model.apply(v, x))
        np.testing.assert_array_equal(
            np.asarray(apply(trained, images)), np.asarray(apply(patched, images))
        )


def test_a_patch_is_refused_on_a_different_base(folder, uninterrupted):
    workdir, _ = uninterrupted
    s = trainer.setup(_config(folder))
    other = jax.tree.map(lambda x: np.asarray(x) * 1.001, s.base.variables)
    with pytest.raises(PatchFileError, match="different base model"):
        apply_patch(other, load_patch(workdir / "patches" / "digits"))


def test_nan_loss_stops_with_advice_and_keeps_the_last_checkpoint(folder, tmp_path):
    config = _config(folder, num_steps=6, optimizer="sgd")
    config.tasks = [task("digits", resolution=32)]
    trainer.train(config, str(tmp_path), stop_at_step=2)
    config.learning_rate.scale_bias = 1e30  # SGD diverges to inf, then NaN.
    config.learning_rate.logits = 1e30
    with pytest.raises(trainer.TrainingError, match=r"NaN.*learning_rate.*step 2\) is kept"):
        trainer.train(config, str(tmp_path))
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch": "scale_bais"}, "unknown patch preset"),
        ({"optimizer": "adagrad"}, "use adamw, adam or sgd"),
        ({"schedule": "step"}, "use cosine, constant or onecycle"),
        ({"num_steps": 0}, "must be positive"),
        ({"task_chunk": -2}, r"use 0 \(auto\), -1 \(all tasks at once\)"),
    ],
)
def test_bad_config_values_name_the_fix(folder, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.train(_config(folder, **overrides), str(tmp_path))


def test_resuming_with_an_incompatible_config_says_so(folder, tmp_path):
    config = _config(folder, num_steps=4)
    config.tasks = [task("digits", resolution=32)]
    trainer.train(config, str(tmp_path), stop_at_step=2)
    config.optimizer = "sgd"
    with pytest.raises(ValueError, match="new --workdir"):
        trainer.train(config, str(tmp_path))


def test_missing_dataset_folder_names_the_expected_layout(tmp_path):
    config = _config(tmp_path)
    config.tasks = [task(f"folder:{tmp_path / 'nope'}")]
    with pytest.raises(ValueError, match="no such dataset folder"):
        trainer.train(config, str(tmp_path / "run"))


def test_corrupt_image_files_are_named_before_training(tmp_path):
    root = _write_folder(tmp_path / "data", per_class=2)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    config = _config(root)
    config.tasks = [task(f"folder:{root}", resolution=32)]
    with pytest.raises(ValueError, match="broken.jpg"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_class_mismatch_between_splits_is_an_error(tmp_path):
    root = _write_folder(tmp_path / "data", per_class=2)
    (root / "test" / "blue").rename(root / "test" / "cyan")
    config = _config(root)
    config.tasks = [task(f"folder:{root}", resolution=32)]
    with pytest.raises(ValueError, match="cyan|blue"):
        trainer.train(config, str(tmp_path / "run"))


def _launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_launcher_rejects_unknown_config_keys_and_arguments(tmp_path):
    result = _launch("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                     "--config.num_stepz=3")
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    result = _launch("--config", "configs/transfer.py:dataset=digits,patchh=logits",
                     "--workdir", str(tmp_path))
    assert result.returncode != 0
    assert "unknown config argument" in result.stderr and "patchh" in result.stderr
    result = _launch("--config", "configs/transfer.py:dataset=folder:/nonexistent/data",
                     "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


def test_every_config_file_builds(tmp_path):
    import importlib.util

    for path in sorted((REPO / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(None)
        assert config.tasks and config.num_steps > 0, path.name
        trainer.build_optimizer(config, {"a": "scale_bias", "b": "logits", "c": "shared"})


def test_cli_eval_export_and_predict_with_a_patch(uninterrupted, tmp_path, capsys):
    from kfor1.cli import main

    workdir, summary = uninterrupted
    assert main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for name, t in summary["tasks"].items():
        assert name in out and f"{100 * t['accuracy']:.2f}%" in out

    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("patches") == 2
    for name in ("digits", "colours"):
        a = load_patch(workdir / "patches" / name)
        b = load_patch(tmp_path / "patches" / name)
        jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
        assert a.meta == b.meta

    image = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(image)
    assert main(["predict", "--patch", str(workdir / "patches" / "colours"), "--top-k", "3",
                 str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image)
    assert sorted(line.split()[-1] for line in lines[1:]) == ["blue", "green", "red"]

    assert main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_params_reports_patch_sizes(capsys):
    from kfor1.cli import main

    assert main(["params", "--model", "efficientnet_lite0", "--patch", "scale_bias",
                 "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "42,016" in out and "K tasks cost" in out
    assert main(["params", "--patch", "scale_bais"]) == 2
    assert "unknown patch preset" in capsys.readouterr().err
