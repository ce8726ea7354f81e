"""The command line: every command, and one message for one user error whichever entry point
(``kfor1 ...`` or ``python -m launch.*``) ran it.

Read as a specification of ``kfor1.trainer.cli`` and ``launch/``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from kfor1.errors import USER_ERRORS, TrainingError
from kfor1.files.patchfile import load_patch
from kfor1.trainer import cli

REPO = Path(__file__).resolve().parents[1]


def test_eval_export_and_predict_with_a_patch(trained_run, tmp_path, capsys):
    workdir, summary = trained_run
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    for name, t in summary["tasks"].items():
        assert name in out and f"{100 * t['accuracy']:.2f}%" in out

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("patches") == 2
    for name in ("digits", "colours"):
        a = load_patch(workdir / "patches" / name)
        b = load_patch(tmp_path / "patches" / name)
        jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
        assert a.meta == b.meta

    image = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(image)
    assert cli.main(["predict", "--patch", str(workdir / "patches" / "colours"), "--top-k", "3",
                     str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image)
    assert sorted(line.split()[-1] for line in lines[1:]) == ["blue", "green", "red"]

    assert cli.main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_version(capsys):
    import kfor1

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kfor1 {kfor1.__version__}"


def test_train_help_names_every_flag(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--config", "--config.KEY=VALUE", "--workdir", "resumed if present",
                 "--dry-run", "--stop_at_step", "resumes from there", "--help-config"):
        assert text in out, text


def test_help_config_prints_fields_values_and_meanings(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", f"{REPO}/configs/transfer.py:dataset=digits",
                     "--config.num_steps=7", "--workdir", str(workdir), "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "num_steps = 7  (an integer >= 1)\n    Training steps" in out  # Value, range, meaning.
    assert "learning_rate.scale_bias = " in out and "tasks = [{'dataset': 'digits'" in out
    assert not workdir.exists()  # Nothing trained, nothing written.

    assert cli.main(["train", "--help_config"]) == 0  # Without --config: the defaults.
    assert "model = 'efficientnet_lite0'" in capsys.readouterr().out


def test_help_config_refuses_what_it_cannot_use(capsys):
    assert cli.main(["train", "--help-config", "--workdir", "runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --help-config without --config") and "\n" not in err
    assert cli.main(["train", "--config", f"{REPO}/configs/transfer.py", "--config.num_stepz=3",
                     "--help-config"]) == 2
    assert "unknown config field 'num_stepz'" in capsys.readouterr().err


def test_every_config_field_has_a_meaning():
    """A field added to base_config without a comment would print bare under --help-config."""
    from kfor1.trainer.config import base_config
    from kfor1.trainer.config_help import field_comments

    comments = field_comments()
    assert sorted(set(base_config()) - set(comments)) == []
    assert comments["batch_size"] == "Per task and step."
    assert comments["validation"].startswith("A fraction (e.g. \"0.1\")")  # A block above.


def test_params_reports_patch_sizes(capsys):
    assert cli.main(["params", "--model", "efficientnet_lite0", "--patch", "scale_bias",
                     "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "42,016" in out and "K tasks cost" in out
    assert cli.main(["params", "--patch", "scale_bais"]) == 2
    assert "unknown patch preset" in capsys.readouterr().err


def test_train_summary_table(trained_run):
    _, summary = trained_run
    lines = cli.format_summary(summary).splitlines()
    assert lines[0].split() == ["task", "classes", "patch", "params", "patch", "file", "accuracy"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split()[:2] == ["digits", "10"] and lines[3].split()[:2] == ["colours", "3"]


# --- one message per user error, from every entry point --------------------------------------


def _via_kfor1(argv, capsys):
    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


def _via_launch(argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["launch/train.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("launch.train", run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("error", [*USER_ERRORS, TrainingError],
                         ids=lambda e: e.__name__)
def test_every_user_error_class_is_the_same_one_line_from_both_entry_points(
    error, tmp_path, capsys, monkeypatch
):
    def fail(*args, **kwargs):
        raise error("the thing was wrong;\n  do this instead")

    monkeypatch.setattr("kfor1.trainer.loop.train", fail)
    argv = ["--config", "configs/quickstart.py", "--workdir", str(tmp_path)]
    monkeypatch.chdir(REPO)
    results = [_via_kfor1(argv, capsys), _via_launch(argv, capsys, monkeypatch)]
    assert results[0] == results[1] == (2, "error: the thing was wrong; do this instead\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "configs/quickstart.py", "--config.num_stepz=3"],
         "unknown config field 'num_stepz'"),
        (["--config", "configs/transfer.py:dataset=digits,patchh=logits"],
         "unknown config argument 'patchh'; did you mean 'patch'?"),
        (["--config", "configs/nope.py"], "configs/nope.py"),
        (["--config", "configs/quickstart.py", "--config.num_steps=many"], "many"),
        (["--config", "configs/quickstart.py", "--bogus=1"], "bogus"),
        (["--config", "configs/quickstart.py", "extra"], "unexpected arguments ['extra']"),
        ([], "--config and --workdir are required"),
        (["--config", "configs/transfer.py:dataset=folder:/nonexistent/data",
          "--config.eval_batch_size=96"], "no such dataset folder /nonexistent/data"),
        (["--config", "configs/transfer.py:dataset=digits,patch=input_stats+logits",
          "--config.model=tests.user_model:factory", "--config.eval_batch_size=96"],
         "input_stats needs one BatchNorm beside the convolution over the image"),
    ],
    ids=["unknown-field", "unknown-argument", "missing-file", "bad-value", "unknown-flag",
         "extra-argument", "missing-flags", "missing-data", "input-stats-unclear"],
)
def test_config_mistakes_are_the_same_one_line_from_both_entry_points(
    argv, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    if argv:
        argv = [*argv, "--workdir", str(tmp_path / "run")]
    results = [_via_kfor1(argv, capsys), _via_launch(argv, capsys, monkeypatch)]
    assert results[0] == results[1]
    code, err = results[0]
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_launch_train_as_a_process_ends_in_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", "configs/quickstart.py",
         "--workdir", str(tmp_path), "--config.num_stepz=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown config field")
    assert "Traceback" not in result.stderr
