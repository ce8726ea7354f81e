"""``kfor1 train --dry-run``: every paper config checks on this CPU machine without its datasets,
reporting them missing with the command that prepares them; config mistakes still fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfor1.trainer import cli

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted(p.name for p in (REPO / "configs").glob("paper_*.py"))


@pytest.mark.parametrize("name", PAPER)
def test_every_paper_config_dry_runs_without_its_data(name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert cli.main(["train", "--config", f"configs/{name}", "--dry-run",
                     f"--config.data_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "model: mobilenet_v2" in out and "mobilenet_v2-b0353104.pth (packaged)" in out
    assert "K tasks cost" in out and "peak learning rates" in out
    problems = out.split("problem(s) for this host", 1)[1]
    if "tfds:" in out:
        assert "tfds build" in problems
    else:  # FGVC-Aircraft is an image folder.
        assert "no such dataset folder" in problems
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_available_data_is_ready(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["train", "--config", "configs/transfer.py:dataset=digits", "--dry-run",
                     "--config.mesh.data=0", "--config.eval_batch_size=96"]) == 0
    out = capsys.readouterr().out
    assert "10 classes; 1,437 train, 360 test" in out and out.rstrip().endswith("ready to train")


def test_config_mistakes_fail_the_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["train", "--config", "configs/paper_flowers.py:patch=scale_bais",
                     "--dry-run"]) == 2
    assert "unknown patch preset" in capsys.readouterr().err
