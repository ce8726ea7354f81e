"""``kfor1 sweep`` (kfor1/trainer/sweep.py, kfor1/trainer/sweep_report.py): every patch at a small
learning-rate
grid, chosen on validation, the test split read once at the end, resumable, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import kfor1.data
import kfor1.trainer.sweep as sweep_module
from kfor1.trainer.cli import main
from kfor1.trainer.config import base_config, task
from kfor1.trainer.sweep import SweepError, parse_grid, parse_patches, sweep
from kfor1.trainer.sweep_report import pareto_front, plot

TIMINGS = ("train_seconds", "images_per_s")


def _tiny_config(dataset: str = "digits", **overrides):
    """A user model of two small convolutions on digits at 32 px, 6 steps: seconds a run."""
    c = base_config()
    c.model = "tests.user_model:factory"
    c.tasks = [task(dataset, resolution=32)]
    c.num_steps, c.batch_size, c.warmup_steps = 6, 8, 1
    c.log_every, c.checkpoint_every, c.eval_batch_size = 2, 2, 48
    c.validation, c.progress, c.augment.crop = "0.1", False, "pad"
    for key, value in overrides.items():
        c[key] = value
    return c


def _without_timings(result: dict) -> dict:
    strip = [{k: v for k, v in r.items() if k not in TIMINGS} for r in result["runs"]]
    chosen = [{k: v for k, v in r.items() if k not in TIMINGS} for r in result["chosen"]]
    return {**result, "runs": strip, "chosen": chosen}


def test_sweep_on_digits_writes_json_markdown_and_a_plot_with_one_point_per_patch(
        tmp_path, capsys):
    workdir = tmp_path / "sweep"
    code = main([
        "sweep", "--config", "configs/transfer.py:dataset=digits,resolution=32,num_steps=8,"
        "batch_size=8", "--config.eval_batch_size=48", "--config.progress=false",
        "--config.log_every=4", "--config.checkpoint_every=8", "--config.warmup_steps=1",
        "--patches", "logits,stats+logits,scale_bias+logits", "--lrs", "x1,x3",
        "--workdir", str(workdir),
    ])
    out = capsys.readouterr().out
    assert code == 0 and "recommendation: `" in out
    result = json.loads((workdir / "sweep.json").read_text())
    assert result["status"] == "done" and len(result["runs"]) == 6
    assert [r["patch"] for r in result["chosen"]] == ["logits", "stats+logits",
                                                      "scale_bias+logits"]
    for run in result["runs"]:
        assert 0 <= run["val_accuracy"] <= 1 and run["trainable_parameters"] > 0
        assert run["patch_file_bytes"] > 0 and run["train_seconds"] > 0
    by_patch = {r["patch"]: r for r in result["chosen"]}
    # The stats patch trains the head only, and carries every BN layer's statistics.
    assert by_patch["stats+logits"]["trainable_parameters"] == \
        by_patch["logits"]["trainable_parameters"]
    assert by_patch["stats+logits"]["patch_statistics"] > 0 == by_patch["logits"][
        "patch_statistics"]
    assert by_patch["scale_bias+logits"]["learning_rates"]["scale_bias"] > \
        by_patch["scale_bias+logits"]["learning_rates"]["logits"]
    for r in result["chosen"]:  # The chosen run is the best on validation among its grid.
        mine = [x["val_accuracy"] for x in result["runs"] if x["patch"] == r["patch"]]
        assert r["val_accuracy"] == max(mine) and 0 <= r["test_accuracy"] <= 1
    markdown = (workdir / "sweep.md").read_text()
    assert result["recommendation"] in markdown and "★" in markdown
    assert result["splits"]["val_accuracy"].startswith("validation: 0.1 of train, stratified")
    assert result["grid"] == ["x1", "x3"] and " ± " in markdown
    assert all(r["val_examples"] > 0 for r in result["runs"])
    with Image.open(workdir / "sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    figure = plot(result, str(tmp_path / "again.png"))
    validation, test = figure.axes[0].collections[:2]
    assert len(validation.get_offsets()) == len(test.get_offsets()) == 3
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert sorted(labels) == sorted(2 * ["logits", "stats+logits", "scale_bias+logits"])


def test_the_test_split_is_never_opened_before_the_final_evaluations(tmp_path, monkeypatch):
    final = []
    real_load, real_evaluate = kfor1.data.load_source, sweep_module.evaluate_workdir

    def load_source(source, split, **kwargs):
        if split == "test" and not final:
            raise AssertionError(f"the test split of {source} was opened before the sweep's "
                                 "final evaluations")
        return real_load(source, split, **kwargs)

    def evaluate_workdir(workdir, step=None, **kwargs):
        final.append(Path(workdir).name)
        return real_evaluate(workdir, step, **kwargs)

    monkeypatch.setattr(kfor1.data, "load_source", load_source)
    monkeypatch.setattr(sweep_module, "evaluate_workdir", evaluate_workdir)
    result = sweep(_tiny_config(), str(tmp_path), "logits,scale_bias+logits", "x1,x3")
    assert final == [r["run"] for r in result["chosen"]]  # Once per patch, its chosen run.
    runs = tmp_path / "runs"
    for run in result["runs"]:
        summary = json.loads((runs / run["run"] / "summary.json").read_text())
        assert "accuracy" not in summary["tasks"]["digits"] and "val_accuracy" in \
            summary["tasks"]["digits"]


def test_an_interrupted_sweep_resumes_to_the_same_sweep_json(tmp_path):
    patches, lrs = "logits,scale_bias+logits", "x1,x3"
    reference = sweep(_tiny_config(), str(tmp_path / "whole"), patches, lrs)
    parts = str(tmp_path / "parts")
    # Killed between runs (before the second starts), then during the third (after step 2).
    assert sweep(_tiny_config(), parts, patches, lrs, stop_at=(1, None)) == {
        "stopped_at": {"run": 1}}
    assert sweep(_tiny_config(), parts, patches, lrs, stop_at=(2, 2)) == {
        "stopped_at": {"run": 2, "step": 2}}
    resumed = sweep(_tiny_config(), parts, patches, lrs)
    assert _without_timings(resumed) == _without_timings(reference)
    on_disk = json.loads((Path(parts) / "sweep.json").read_text())
    assert _without_timings(on_disk) == _without_timings(reference)


def test_a_sweep_directory_of_another_sweep_is_refused(tmp_path):
    sweep(_tiny_config(num_steps=2), str(tmp_path), "logits", "x1")
    with pytest.raises(SweepError, match="holds a sweep of other patches"):
        sweep(_tiny_config(num_steps=2), str(tmp_path), "logits", "x1,x3")


def test_pareto_front_keeps_what_nothing_smaller_beats():
    rows = [{"patch": p, "trainable_parameters": n, "val_accuracy": a}
            for p, n, a in [("a", 10, 0.5), ("b", 20, 0.4), ("c", 30, 0.7), ("d", 10, 0.5)]]
    assert pareto_front(rows) == ["a", "d", "c"]


def test_grids_and_patch_lists_parse():
    assert [p.text for p in parse_grid("auto")] == ["x0.33", "x1", "x3"]
    assert [p.value for p in parse_grid("1e-3, 1e-2")] == [1e-3, 1e-2]
    assert parse_patches(" logits , scale_bias+logits ") == ("logits", "scale_bias+logits")


def _one_class_alone(root: Path) -> Path:
    import numpy as np

    for split, counts in (("train", {"ok": 4, "alone": 1}), ("test", {"ok": 2, "alone": 2})):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("args,fragment", [
    (["--patches", "logits,nope"], "--patches: unknown patch preset 'nope'"),
    (["--patches", ""], "--patches is empty"),
    (["--patches", "stats"], "'stats' trains no classifier"),
    (["--lrs", ""], "--lrs is empty"),
    (["--lrs", "x1,1e-3"], "mixes factors"),
    (["--lrs", "fast"], "'fast' is neither a learning rate"),
    (["--lrs", "x0"], "'x0' must be a positive number"),
    (["--config.validation=1.5"], "config.validation='1.5'"),
    (["--config.validation=0"], None),  # Filled in below: the sweep holds 0.1 out itself.
    (["--config.num_steps=0"], "config.num_steps=0 is out of range"),
])
def test_bad_sweep_input_is_one_line_before_training(args, fragment, tmp_path, capsys,
                                                     monkeypatch):
    if fragment is None:  # No error: the note, then (the training here replaced) a sweep.
        monkeypatch.setattr(sweep_module, "_sweep", lambda *a: {"recommendation": "ok"})
    config = "configs/transfer.py:dataset=digits,resolution=32"
    code = main(["sweep", "--config", config, "--workdir", str(tmp_path / "w"), *args])
    captured = capsys.readouterr()
    if fragment is None:
        assert code == 0 and "holds 0.1 of the train split out" in captured.out
        return
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], captured.err
    assert not (tmp_path / "w" / "runs").exists()


def test_a_class_the_validation_split_would_miss_is_one_line(tmp_path, capsys):
    folder = _one_class_alone(tmp_path / "data")
    code = main(["sweep", "--config", f"configs/transfer.py:dataset=folder:{folder}",
                 "--config.model=tests.user_model:factory", "--config.batch_size=8",
                 "--config.eval_batch_size=8", "--patches", "logits",
                 "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "class 'alone' has a single training example" in \
        err[0]


def test_a_multitask_config_is_refused(tmp_path, capsys):
    code = main(["sweep", "--config", "configs/multitask.py", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "takes a config with one task" in err


def test_launch_sweep_is_kfor1_sweep(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "--config", "configs/transfer.py", "--patches",
         "logits,nope", "--workdir", str(tmp_path)], cwd=repo, capture_output=True, text=True,
        timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "unknown patch preset 'nope'" in lines[0] and "Traceback" not in done.stderr


def _chosen(patch, params, val, val_n, grid_point="x1", test=0.5):
    return {"patch": patch, "trainable_parameters": params, "percent_of_model": params / 1e4,
            "val_accuracy": val, "val_examples": val_n, "test_accuracy": test,
            "test_examples": 400, "grid_point": grid_point, "learning_rates": {"logits": 1e-3},
            "patch_file_bytes": 4 * params, "train_seconds": 1.0, "images_per_s": 10.0,
            "val_loss": 1.0, "run": f"{patch}@{grid_point}"}


def test_the_sweep_says_when_its_answer_is_weak(tmp_path):
    """Issue 36: a sweep chose rates at the edge of its grid for 7 of 8 patches without a word,
    and recommended a patch 2 points ahead with a standard error of ~1.9 points each. Now
    sweep.md gives each accuracy's standard error, says which patches the recommendation cannot
    be told apart from, and flags a choice at either end of the grid."""
    from kfor1.trainer.sweep_report import (
        grid_edge,
        inseparable,
        recommendation,
        standard_error,
        write_markdown,
    )

    assert standard_error(0.5, 400) == pytest.approx(0.025)
    assert standard_error(0.5, None) is None
    chosen = [_chosen("logits", 100, 0.60, 400, "x0.33"),
              _chosen("scale_bias+logits", 500, 0.62, 400, "x3"),
              _chosen("full", 9000, 0.40, 400, "x1")]
    best = chosen[1]
    assert inseparable(best, chosen) == ["logits"]  # 2 points, se of the difference 3.4.
    sentence = recommendation(chosen, ["logits", "scale_bias+logits"])
    assert sentence.endswith("; not separable on validation from `logits` (within two "
                             "standard errors)"), sentence
    assert "not separable" not in recommendation(
        [_chosen("logits", 100, 0.60, 4000), _chosen("bias+logits", 200, 0.70, 4000)],
        ["logits", "bias+logits"])
    grid = ["x0.33", "x1", "x3"]
    assert [grid_edge(r, grid) for r in chosen] == ["lowest", "highest", None]
    result = {"task": "t", "pareto": ["logits", "scale_bias+logits"], "chosen": chosen,
              "runs": chosen, "recommendation": sentence, "grid": grid}
    text = write_markdown(result, str(tmp_path / "sweep.md"))
    assert "62.00% ± 2.4" in text and "50.00% ± 2.5" in text
    assert "⚠ `logits` chose the lowest point of the grid (x0.33)" in text
    assert "⚠ `scale_bias+logits` chose the highest point of the grid (x3)" in text
    assert "`full` chose" not in text


def test_the_validation_source_is_named_as_it_was_read():
    """Issue 36: sweep.json said "split of train, stratified and seeded" when
    ``validation=split`` read the folder's own ``val/``; summary.json and sweep.json now share
    one description."""
    from kfor1.data import parse_validation
    from kfor1.trainer.metrics import validation_source

    assert validation_source(parse_validation("split")) == \
        "validation: the source's own validation split"
    assert validation_source(parse_validation("0.2")).startswith("validation: 0.2 of train")
