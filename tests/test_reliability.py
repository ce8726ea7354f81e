"""Issue 13's user errors and silent wrong results, one test per case: each is one actionable
line (rc 2, no traceback) raised before any expensive work, or a refusal with its reason.

Read as a specification of the checks in ``kfor1.trainer.config``, ``kfor1.trainer.experiment``,
``kfor1.trainer.loop`` and ``kfor1.trainer.cli``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_runs import run_config

from kfor1.trainer import cli
from kfor1.trainer.config import ConfigError
from kfor1.trainer.experiment import check_values

REPO = Path(__file__).resolve().parents[1]


def _train(argv, capsys):
    code = cli.main(["train", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _config_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unknown_config_argument_says_did_you_mean(tmp_path, capsys):
    code, err = _train(["--config", f"{REPO}/configs/transfer.py:datset=digits",
                        "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "unknown config argument 'datset'; did you mean 'dataset'?" in err


def test_an_unknown_config_flag_names_the_field(tmp_path, capsys):
    code, err = _train(["--config", f"{REPO}/configs/quickstart.py",
                        "--config.num_stepz=3", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "unknown config field 'num_stepz'" in err and "num_steps" in err


@pytest.mark.parametrize("arg, message", [
    ("num_steps=abc", "config argument num_steps='abc': expected an integer"),
    ("resolution=abc", "config argument resolution='abc': expected an integer"),
])
def test_a_config_argument_of_the_wrong_type_names_key_and_type(arg, message, tmp_path, capsys):
    code, err = _train(["--config", f"{REPO}/configs/transfer.py:{arg}",
                        "--workdir", str(tmp_path)], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("key", ["checkpoint_every", "log_every", "keep_checkpoints"])
def test_zero_intervals_are_refused_before_compiling(key, colours):
    config = run_config(colours)
    config[key] = 0
    with pytest.raises(ConfigError, match=f"config.{key}=0 is out of range: use an integer >= 1"):
        check_values(config)


def test_a_config_file_that_does_not_exist(tmp_path, capsys):
    code, err = _train(["--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)],
                       capsys)
    assert code == 2 and "cannot load the config file" in err


def test_a_workdir_that_is_a_file(tmp_path, colours):
    from kfor1.trainer.loop import train

    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        train(run_config(colours), str(path))


def test_a_resolution_of_1_is_refused(colours):
    config = run_config(colours)
    config.tasks[0].resolution = 1
    with pytest.raises(ConfigError, match="resolution=1 is too small; use at least 16"):
        check_values(config)


def test_a_dataset_with_one_class_is_refused(tmp_path):
    from kfor1.trainer.experiment import setup

    for split in ("train", "test"):
        (tmp_path / "one" / split / "only").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(
                tmp_path / "one" / split / "only" / f"{i}.png")
    config = run_config(tmp_path / "one")
    config.tasks = [config.tasks[1]]
    with pytest.raises(ConfigError, match=r"has 1 class \(only\): a classifier needs at least 2"):
        setup(config)


def test_predict_refuses_another_model_than_the_patch_records(trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code = cli.main(["predict", "--model", "nonexistent", "--patch",
                     str(workdir / "patches" / "colours"), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "records model 'efficientnet_lite0', not 'nonexistent' (--model" in err


def test_quickstart_takes_its_argument():
    quickstart = _config_module("quickstart")
    assert quickstart.get_config("num_steps=7,patch=logits").num_steps == 7
    with pytest.raises(ConfigError, match="unknown config argument 'steps'"):
        quickstart.get_config("steps=7")


def test_a_refused_resume_leaves_config_json_as_it_was(trained_run, tmp_path, colours):
    from kfor1.trainer.loop import train

    workdir, _ = trained_run
    copy = shutil.copytree(workdir, tmp_path / "run")
    before = (copy / "config.json").read_bytes()
    changed = run_config(colours, patch="depthwise+logits")
    with pytest.raises(ValueError, match="holds another run .patch 'scale_bias.logits' -> "
                       "'depthwise.logits'"):
        train(changed, str(copy))
    assert (copy / "config.json").read_bytes() == before


def test_eval_of_a_pruned_step_says_which_steps_exist(trained_run, capsys):
    workdir, _ = trained_run
    assert cli.main(["eval", "--workdir", str(workdir), "--step", "1"]) == 2
    assert "no checkpoint at step 1" in (err := capsys.readouterr().err) and "it keeps steps" in err


def test_a_diverging_run_stops_and_checkpoints_only_healthy_states(colours, tmp_path):
    """Adam at a learning rate of 1e6: losses of 1e9 and more that are never NaN."""
    import jax

    from kfor1.errors import TrainingError
    from kfor1.trainer.checkpoint import Checkpointer
    from kfor1.trainer.experiment import setup
    from kfor1.trainer.loop import train

    config = run_config(colours, num_steps=8, checkpoint_every=1)
    config.tasks = [config.tasks[0]]
    train(config, str(tmp_path), stop_at_step=2)
    config.learning_rate.scale_bias = 1e6
    config.learning_rate.logits = 1e6
    with pytest.raises(TrainingError, match=r"(diverged|NaN/inf).* at step \d.*lower "
                       r"config.learning_rate.(scale_bias|logits) \(now 1e\+06"):
        train(config, str(tmp_path))
    assert not (tmp_path / "patches").exists()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    state = ckpt.restore(setup(config).init_state())
    ckpt.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.opt_state))


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_mid_run_saves_the_last_step_and_resumes(signum, colours, tmp_path):
    """Ctrl-C or a preemption's SIGTERM while training: the step in flight completes, its
    checkpoint is written, the process exits with one line, and the same command resumes."""
    import json
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "config.py"
    tests, folder = str(REPO / "tests"), str(colours)
    config.write_text(
        f"import sys\nsys.path.insert(0, {tests!r})\nfrom tiny_runs import run_config\n"
        f"def get_config():\n    c = run_config({folder!r}, num_steps=400, log_every=1, "
        "checkpoint_every=1000)\n    c.tasks = [c.tasks[0]]\n    return c\n"
    )
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "launch.train", "--config", str(config), "--workdir",
            str(workdir)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")
                                          >= 2):
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert f"{signum} received: stopped after step" in err
    stopped = int(err.split("stopped after step ")[1].split(",")[0])
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert stopped >= 2 and steps[-1] == stopped
    from kfor1.trainer.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == stopped
    ckpt.close()


def test_training_and_predict_decode_a_file_the_same_way(tmp_path):
    """RGBA over white and EXIF orientation, in the input pipeline as in kfor1 predict."""
    import tensorflow as tf

    from kfor1.data import decode_image
    from kfor1.images import load_image

    rgba = np.zeros((6, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # Left half opaque red, right half transparent.
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    photo = Image.fromarray(np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    for name, shape in (("alpha.png", (6, 10, 3)), ("phone.jpg", (10, 6, 3))):
        served = load_image(tmp_path / name)
        trained = decode_image(tf.constant((tmp_path / name).read_bytes())).numpy()
        assert served.shape == trained.shape == shape
        np.testing.assert_array_equal(trained, served)
    assert (load_image(tmp_path / "alpha.png")[:, 5:] == 255).all()  # Composited on white.
