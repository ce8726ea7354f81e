"""``kfor1.trainer.metrics.train_scalars``: a logged step's scalars, and images/s only when
measured."""

from __future__ import annotations

import numpy as np

from kfor1.trainer.metrics import train_scalars


def test_train_scalars_names_every_task_and_group():
    metrics = {"loss": np.array([0.5, 1.5]), "accuracy": np.array([0.25, 0.75])}
    scalars = train_scalars(["a", "b"], metrics, {"patch": 1e-3}, 123.0)
    assert scalars == {"lr/patch": 1e-3, "train/loss/a": 0.5, "train/accuracy/a": 0.25,
                       "train/loss/b": 1.5, "train/accuracy/b": 0.75, "images_per_s": 123.0}


def test_a_log_of_the_compiling_step_alone_has_no_rate():
    metrics = {"loss": np.array([0.5]), "accuracy": np.array([1.0])}
    assert "images_per_s" not in train_scalars(["a"], metrics, {}, None)


def test_a_resume_drops_a_last_line_cut_short_with_a_note(tmp_path, capsys):
    """A run killed while writing ``metrics.jsonl`` left half a line: the resume drops it,
    says so, and keeps the lines up to its step (issue 31)."""
    import json

    from kfor1.trainer.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (2, 4, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 8, "train/lo')
    MetricsLog(str(path), str(tmp_path / "events"), resume_step=4)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert "dropped its last line, cut short" in capsys.readouterr().err


def test_a_bad_line_before_the_last_is_named(tmp_path):
    import pytest

    from kfor1.trainer.metrics import MetricsFileError, MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(MetricsFileError, match="metrics.jsonl line 2 is not a metrics record"):
        MetricsLog(str(path), str(tmp_path / "events"), resume_step=4)
