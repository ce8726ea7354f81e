"""A run's directory: its layout, in one place, and what ``kfor1 eval`` and ``kfor1 export``
do with it.

Layout::

    config.json            the run's config: eval and export rebuild the run from it
    tasks.json             each task's name, data source, resolution and classes
    metrics.jsonl          step, per-task train loss/accuracy, eval accuracy, learning rates, img/s
    events.out.tfevents.*  the same scalars for TensorBoard
    checkpoints/<step>/    orbax checkpoints (resumed automatically, a bounded number kept)
    patches/<task>/        one patch file per task (see kfor1.patchfile)
    base/                  train_shared runs only: the trained base the patches apply to
                           (see kfor1.basefile)
    summary.json           per task: eval accuracy, patch parameters, patch bytes; totals

``evaluate_workdir`` and ``export_workdir`` need only the workdir; they set the run up without
its train splits (classes from ``tasks.json``), so a run can be evaluated where only its test
data is.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from kfor1.basefile import atomic_write, export_base, patch_leaves, trained_base
from kfor1.checkpoint import Checkpointer
from kfor1.evaluate import Results, evaluate
from kfor1.experiment import Setup, setup
from kfor1.multitask import MultiTaskState
from kfor1.patchfile import export_patch, task_meta

CONFIG_FILE = "config.json"
TASKS_FILE = "tasks.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
PATCHES_DIR = "patches"
BASE_DIR = "base"


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The paths of a run's directory (``root`` is made absolute)."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))

    @property
    def config(self) -> str:
        return os.path.join(self.root, CONFIG_FILE)

    @property
    def tasks(self) -> str:
        return os.path.join(self.root, TASKS_FILE)

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, METRICS_FILE)

    @property
    def summary(self) -> str:
        return os.path.join(self.root, SUMMARY_FILE)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, CHECKPOINTS_DIR)

    @property
    def base(self) -> str:
        return os.path.join(self.root, BASE_DIR)

    @property
    def patches(self) -> str:
        return os.path.join(self.root, PATCHES_DIR)

    def patch(self, task: str) -> str:
        return os.path.join(self.patches, task)


def as_workdir(workdir: str | os.PathLike | Workdir) -> Workdir:
    return workdir if isinstance(workdir, Workdir) else Workdir(os.fspath(workdir))


def save_run(s: Setup, workdir: str | Workdir) -> None:
    """Writes ``config.json`` and ``tasks.json`` at the start of a run."""
    workdir = as_workdir(workdir)
    os.makedirs(workdir.root, exist_ok=True)
    atomic_write(workdir.config, s.config.to_json_best_effort(indent=2))
    tasks = [{"name": t.task.name, "dataset": t.info.name, "resolution": t.task.resolution,
              "class_names": list(t.info.class_names)} for t in s.tasks]
    atomic_write(workdir.tasks, json.dumps(tasks, indent=2))


def load_config(workdir: str | Workdir) -> ml_collections.ConfigDict:
    """The config a ``kfor1 train`` run saved in ``workdir``."""
    workdir = as_workdir(workdir)
    if not os.path.exists(workdir.config):
        raise FileNotFoundError(
            f"{workdir.root} holds no {CONFIG_FILE}; is it the --workdir of a `kfor1 train` run?"
        )
    with open(workdir.config, encoding="utf-8") as f:
        data = json.load(f)
    # ConfigDict converts nested dicts but not dicts inside lists.
    data["tasks"] = [ml_collections.ConfigDict(t) for t in data.get("tasks", [])]
    return ml_collections.ConfigDict(data)


def _class_names(workdir: Workdir, config: ml_collections.ConfigDict) -> list[list[str]] | None:
    if not os.path.exists(workdir.tasks):
        return None  # A run from before tasks.json: the train splits give the classes.
    with open(workdir.tasks, encoding="utf-8") as f:
        tasks = json.load(f)
    if [t["name"] for t in tasks] != [t.name for t in config.tasks]:
        raise ValueError(f"{workdir.tasks} and {workdir.config} name different tasks; "
                         "the workdir was edited by hand — restore both files")
    return [t["class_names"] for t in tasks]


def restore(workdir: str | Workdir, step: int | None = None) -> tuple[Setup, MultiTaskState]:
    """The run's eval-only setup and its state at ``step`` (default: the latest checkpoint)."""
    workdir = as_workdir(workdir)
    config = load_config(workdir)
    config.progress = False
    names = _class_names(workdir, config)
    s = setup(config, train=names is None, class_names=names)
    checkpointer = Checkpointer(workdir.checkpoints)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir.checkpoints}; train first")
        state = checkpointer.restore(s.init_state(), step)
    finally:
        checkpointer.close()
    return s, state


def export_patches(s: Setup, state: MultiTaskState, workdir: str | Workdir) -> dict[str, str]:
    """Writes ``patches/<task>/`` for every task of the run, and for a run that trained its
    backbone (``train_shared``) the base they apply to, ``base/``; returns the patch dirs."""
    workdir = as_workdir(workdir)
    if s.config.train_shared:
        export_base(
            trained_base(state, s.base.variables), s.base.model, patch_leaves(state),
            workdir.base, {"model": s.config.model, "preprocessing": s.base.preprocessing.to_dict(),
                           "started_from": {"weights": s.config.weights or "packaged",
                                            "source": os.path.basename(s.base.source)},
                           "step": int(state.step)},
        )
    out = {}
    for i, t in enumerate(s.tasks):
        meta = task_meta(
            class_names=t.info.class_names, preprocessing=s.base.preprocessing,
            resolution=t.task.resolution, crop_fraction=s.eval_crop_fraction, spec=s.spec,
            model=s.config.model, weights=s.config.weights, source=s.base.source,
            dataset=t.info.name,
            trained_base=(os.path.relpath(workdir.base, workdir.patch(t.task.name))
                          if s.config.train_shared else None),
        )
        out[t.task.name] = export_patch(state, i, workdir.patch(t.task.name), meta)
    return out


def evaluate_workdir(workdir: str, step: int | None = None) -> Results:
    """Every task's test accuracy and loss at a checkpoint of the run in ``workdir``."""
    s, state = restore(workdir, step)
    return evaluate(s, state)


def export_workdir(workdir: str, out: str | None = None, step: int | None = None) -> dict:
    """Patch files of every task from a checkpoint, under ``out`` (default: the workdir)."""
    s, state = restore(workdir, step)
    return export_patches(s, state, out or workdir)
