"""``kfor1 sweep``: which patch for my data, at which learning rates, and what it costs.

Every patch of a list trains at the same budget (the config's steps, batch and schedule) with
each learning-rate setting of a small grid; the setting of each patch is chosen on the
**validation** split, and only the chosen runs are then evaluated on the test split, once, at
the end: no run of a sweep opens the test split while the sweep is still choosing
(``config.evaluate_test=False``, ``kfor1.trainer.experiment``).

A grid point scales every patch group's learning rate together (``x0.33``: a third of each
group's configured rate, so BatchNorm's scale/bias keeps its larger rate than the classifier's),
or sets them all to one value (``0.001``). The default grid, ``auto``, is ``x0.33, x1, x3``.

Workdir layout::

    sweep_config.json   what the sweep is (patches, grid, the base config): a rerun must match
    runs/<patch>@<lr>/  one kfor1 run directory per (patch, grid point) (kfor1.trainer.workdir)
    runs/<...>/test.json  the test results of a chosen run
    sweep.json          every run: patch, learning rates, parameters, bytes, accuracies, time
    sweep.md, sweep.png  the table with the recommendation, and accuracy against parameters

A sweep is resumable: runs with a summary are kept, an interrupted run resumes from its last
checkpoint (so the final ``sweep.json`` is the one an uninterrupted sweep writes, timings
apart), and the chosen runs' test results are kept once computed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from kfor1.data import parse_validation
from kfor1.errors import UserError
from kfor1.files.atomic import atomic_write
from kfor1.patch.spec import STATS_ONLY, PatchSpec, PatchSpecError
from kfor1.trainer.experiment import check_values
from kfor1.trainer.loop import train
from kfor1.trainer.metrics import validation_source
from kfor1.trainer.sweep_report import (
    grid_edge,
    pareto_front,
    plot,
    recommendation,
    write_markdown,
)
from kfor1.trainer.workdir import SUMMARY_FILE, Workdir, evaluate_workdir, locked

AUTO_GRID = ("x0.33", "x1", "x3")
DEFAULT_PATCHES = ("logits", "input_stats+logits", "stats+logits", "bias+logits",
                   "scale_bias+logits", "depthwise+logits", "depthwise+scale_bias+logits", "full")
SWEEP_FILE = "sweep.json"
CONFIG_FILE = "sweep_config.json"
TEST_FILE = "test.json"


class SweepError(UserError, ValueError):
    """A sweep that cannot run as asked: its patches, grid, config or directory."""


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """A learning-rate setting: each group's configured rate times ``factor``, or ``value``."""

    text: str
    factor: float | None = None
    value: float | None = None

    def rates(self, config: ml_collections.ConfigDict, groups: Sequence[str]) -> dict[str, float]:
        if self.value is not None:
            return {g: self.value for g in groups}
        return {g: float(config.learning_rate[g]) * self.factor for g in groups}


def parse_patches(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"logits,scale_bias+logits"`` -> the patches, each a valid preset spec, none twice."""
    items = text.split(",") if isinstance(text, str) else list(text)
    patches = tuple(p.strip() for p in items if p.strip())
    if not patches:
        raise SweepError("--patches is empty; give presets separated by commas, e.g. "
                         "logits,scale_bias+logits")
    for p in patches:
        try:
            PatchSpec.parse(p)
        except PatchSpecError as e:
            raise SweepError(f"--patches: {e}") from None
    repeated = sorted({p for p in patches if patches.count(p) > 1})
    if repeated:
        raise SweepError(f"--patches names {repeated[0]!r} twice; give each patch once")
    return patches


def parse_grid(text: str | Sequence[str]) -> tuple[GridPoint, ...]:
    """``auto``, factors (``x0.5,x2``) or learning rates (``1e-3,1e-2``), not both kinds."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = [t.strip() for t in items if t.strip()]
    if items == ["auto"]:
        items = list(AUTO_GRID)
    if not items:
        raise SweepError("--lrs is empty; give 'auto', factors of each group's rate (x0.33,x1,"
                         "x3) or learning rates (1e-3,1e-2)")
    points = []
    for t in items:
        factor = t.startswith("x")
        try:
            number = float(t[1:] if factor else t)
        except ValueError:
            raise SweepError(f"--lrs: {t!r} is neither a learning rate (1e-3) nor a factor "
                             "(x0.5)") from None
        if not math.isfinite(number) or number <= 0:
            raise SweepError(f"--lrs: {t!r} must be a positive number")
        points.append(GridPoint(t, factor=number) if factor else GridPoint(t, value=number))
    if len({p.factor is None for p in points}) > 1:
        raise SweepError("--lrs mixes factors (x2) and learning rates (1e-3); use one kind")
    if len({p.text for p in points}) < len(points):
        raise SweepError("--lrs repeats a value; give each once")
    return tuple(points)


def run_name(patch: str, point: GridPoint) -> str:
    return f"{patch}@{point.text}"


def _run_config(config: ml_collections.ConfigDict, patch: str, rates: dict[str, float]):
    c = copy.deepcopy(config)
    with c.unlocked():
        c.patch = patch
        c.patch_rules = []
        c.evaluate_test = False
        for group, rate in rates.items():
            c.learning_rate[group] = rate
    return c


def _groups(config: ml_collections.ConfigDict, patch: str) -> list[str]:
    """The learning-rate groups of ``patch`` (its presets that own parameters)."""
    spec = PatchSpec.parse(patch)
    groups = [p for p in spec.presets if p not in (*STATS_ONLY, "none")]
    return groups + (["shared"] if config.train_shared else [])


def _check(config: ml_collections.ConfigDict, patches: Sequence[str]) -> None:
    if len(config.tasks) != 1:
        raise SweepError(f"kfor1 sweep takes a config with one task, this one has "
                         f"{len(config.tasks)}; sweep each task on its own")
    for patch in patches:
        if not {"logits", "full"} & set(PatchSpec.parse(patch).presets):
            raise SweepError(f"--patches: {patch!r} trains no classifier for the task's own "
                             f"classes; add it with +logits ({patch}+logits)")
        missing = [g for g in _groups(config, patch) if g not in config.learning_rate]
        if missing:
            raise SweepError(f"patch {patch!r}: config.learning_rate has no {missing[0]!r}")
        check_values(_run_config(config, patch, {}))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=2) + "\n")


def _images_per_s(workdir: Workdir) -> float | None:
    """The median logged training images/s of a run (the logs leave out each process's first,
    compiling step)."""
    if not os.path.exists(workdir.metrics):
        return None
    with open(workdir.metrics, encoding="utf-8") as f:
        rates = [r["images_per_s"] for r in map(json.loads, f) if "images_per_s" in r]
    return sorted(rates)[len(rates) // 2] if rates else None


def _row(patch: str, point: GridPoint, rates: dict[str, float], wd: Workdir,
         seconds: float | None) -> dict[str, Any]:
    s = _read_json(wd.summary)
    (task, t), = s["tasks"].items()
    return {
        "run": run_name(patch, point), "patch": patch, "grid_point": point.text,
        "learning_rates": rates, "task": task,
        "trainable_parameters": t["patch_parameters"],
        "percent_of_model": 100 * s["totals"]["patch_fraction"],
        "patch_statistics": t.get("patch_statistics", 0),
        "patch_file_bytes": t["patch_file_bytes"],
        "val_accuracy": t["val_accuracy"], "val_loss": t["val_loss"],
        "val_examples": t.get("val_examples"),
        "train_seconds": seconds, "images_per_s": _images_per_s(wd),
    }


def sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    patches: str | Sequence[str] = DEFAULT_PATCHES,
    lrs: str | Sequence[str] = "auto",
    *,
    stop_at: tuple[int, int | None] | None = None,
) -> dict[str, Any]:
    """Trains every (patch, grid point), chooses each patch's on validation, tests the chosen.

    Args:
      config: a one-task training config (``configs/transfer.py``); ``config.validation`` ''
        holds out 0.1 of the train split.
      workdir: the sweep's directory (new, or a sweep's to resume it).
      patches: presets, e.g. ``"logits,stats+logits,scale_bias+logits"``.
      lrs: ``"auto"``, factors (``"x0.5,x2"``) or learning rates (``"1e-3,1e-2"``).
      stop_at: ``(run index, step)`` ends the sweep there, as a preemption would: before that
        run starts (step None) or after its checkpoint at ``step``.

    Returns:
      ``sweep.json``'s content: ``runs`` (every run), ``chosen`` (per patch, its run with
      ``test_accuracy``), ``pareto`` and ``recommendation``; or ``{"stopped_at": ...}``.
    """
    patches, grid = parse_patches(patches), parse_grid(lrs)
    config = copy.deepcopy(config)
    if not parse_validation(config.validation):
        with config.unlocked():
            config.validation = "0.1"
        print("note: config.validation was empty; the sweep holds 0.1 of the train split out "
              "to choose on")
    _check(config, patches)
    wd = Workdir(workdir)
    if os.path.exists(wd.root) and not os.path.isdir(wd.root):
        raise SweepError(f"--workdir {wd.root} is a file; give a directory")
    with locked(wd):
        return _sweep(config, wd, patches, grid, stop_at)


def _sweep(config, wd: Workdir, patches, grid, stop_at) -> dict[str, Any]:
    described = {"patches": list(patches), "lrs": [p.text for p in grid],
                 "config": json.loads(config.to_json_best_effort())}
    config_path = os.path.join(wd.root, CONFIG_FILE)
    if os.path.exists(config_path):
        if _read_json(config_path) != described:
            raise SweepError(f"{wd.root} holds a sweep of other patches, grid or config "
                             f"({CONFIG_FILE}); rerun it as it was, or use a new --workdir")
    else:
        _write_json(config_path, described)
    out_path = os.path.join(wd.root, SWEEP_FILE)
    previous = _read_json(out_path) if os.path.exists(out_path) else {}
    seconds = {r["run"]: r["train_seconds"] for r in previous.get("runs", [])}
    rows: list[dict[str, Any]] = []
    plan = [(patch, point) for patch in patches for point in grid]
    for index, (patch, point) in enumerate(plan):
        name = run_name(patch, point)
        run_wd = Workdir(os.path.join(wd.root, "runs", name))
        rates = point.rates(config, _groups(config, patch))
        if not os.path.exists(os.path.join(run_wd.root, SUMMARY_FILE)):
            if stop_at is not None and stop_at[0] == index and stop_at[1] is None:
                return {"stopped_at": {"run": index}}
            print(f"sweep: run {index + 1}/{len(plan)}: {name} "
                  + ", ".join(f"{g}={r:g}" for g, r in rates.items()))
            start = time.perf_counter()
            stop = stop_at[1] if stop_at is not None and stop_at[0] == index else None
            result = train(_run_config(config, patch, rates), run_wd.root, stop_at_step=stop)
            if "stopped_at_step" in result:
                return {"stopped_at": {"run": index, "step": result["stopped_at_step"]}}
            seconds[name] = (seconds.get(name) or 0.0) + time.perf_counter() - start
        rows.append(_row(patch, point, rates, run_wd, seconds.get(name)))
        _write_json(out_path, {"status": "training", "runs": rows})

    # Choose on validation (ties: lower validation loss, then grid order); test the chosen.
    chosen = []
    for patch in patches:
        mine = [r for r in rows if r["patch"] == patch]
        best = max(mine, key=lambda r: (r["val_accuracy"], -r["val_loss"], -mine.index(r)))
        test_path = os.path.join(wd.root, "runs", best["run"], TEST_FILE)
        if os.path.exists(test_path):
            test = _read_json(test_path)
        else:
            # The sweep's own runs, of the model the user's config names.
            (test,) = evaluate_workdir(os.path.join(wd.root, "runs", best["run"]),
                                       model=config.model).values()
            _write_json(test_path, test)
        chosen.append({**best, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                       "test_examples": test["examples"]})
    front = pareto_front(chosen)
    order = sorted(grid, key=lambda p: p.factor if p.factor is not None else p.value)
    result = {
        "status": "done",
        "task": rows[0]["task"],
        "grid": [p.text for p in order],
        "at_grid_edge": {r["patch"]: edge for r in chosen
                         if (edge := grid_edge(r, [p.text for p in order]))},
        "splits": {"val_accuracy": validation_source(parse_validation(config.validation))
                   + "; chooses each patch's learning rates",
                   "test_accuracy": "test: the chosen run of each patch, evaluated once at the "
                   "end"},
        "runs": rows, "chosen": chosen, "pareto": front,
        "recommendation": recommendation(chosen, front),
    }
    _write_json(out_path, result)
    write_markdown(result, os.path.join(wd.root, "sweep.md"))
    plot(result, os.path.join(wd.root, "sweep.png"))
    return result
