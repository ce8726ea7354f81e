"""A run's directory: its layout, in one place, and what ``kfor1 eval`` and ``kfor1 export``
do with it.

Layout::

    config.json            the run's config: eval and export rebuild the run from it
    tasks.json             each task's name, data source, resolution and classes
    metrics.jsonl          step, per-task train loss/accuracy, eval accuracy, learning rates, img/s
    events.out.tfevents.*  the same scalars for TensorBoard
    checkpoints/<step>/    orbax checkpoints (resumed automatically, a bounded number kept)
    patches/<task>/        one patch file per task (see kfor1.files.patchfile)
    base/                  train_shared runs only: the trained base the patches apply to
                           (see kfor1.files.basefile)
    summary.json           per task: eval accuracy, patch parameters, patch bytes; totals
    lock                   held by the run training in it (its PID and host): one run at a time

``evaluate_workdir`` and ``export_workdir`` need only the workdir; they set the run up without
its train splits (classes from ``tasks.json``), so a run can be evaluated where only its test
data is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import jax
import ml_collections

from kfor1.errors import UserError
from kfor1.files.atomic import atomic_write
from kfor1.files.basefile import export_base, patch_leaves, trained_base
from kfor1.files.patchfile import export_patch, task_meta
from kfor1.models.registry import check_named_by_file
from kfor1.multitask.state import MultiTaskState
from kfor1.trainer.checkpoint import Checkpointer
from kfor1.trainer.evaluate import Results, evaluate
from kfor1.trainer.experiment import Setup, setup
from kfor1.untrusted import read_json

CONFIG_FILE = "config.json"
TASKS_FILE = "tasks.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
PATCHES_DIR = "patches"
BASE_DIR = "base"
LOCK_FILE = "lock"


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

    @property
    def lock(self) -> str:
        return os.path.join(self.root, LOCK_FILE)

    def patch(self, task: str) -> str:
        return os.path.join(self.patches, task)


class WorkdirError(UserError, ValueError):
    """A run directory whose files are missing, malformed, or disagree with each other."""


class WorkdirBusyError(UserError, RuntimeError):
    """Another live process is training in this workdir."""


@contextlib.contextmanager
def locked(workdir: str | Workdir) -> Iterator[None]:
    """Holds ``workdir``'s lock while a run trains in it: a second run into the same workdir
    is refused (naming the holder's PID and host) instead of corrupting the first's
    checkpoints and metrics.

    The lock is an ``flock`` on ``<workdir>/lock``, which the kernel releases when its process
    dies, so a run killed with ``kill -9`` leaves a stale lock that the next run takes over
    (it says so). Only process 0 of a multi-process run takes it.
    """
    workdir = as_workdir(workdir)
    if jax.process_index() > 0:
        yield
        return
    os.makedirs(workdir.root, exist_ok=True)
    fd = os.open(workdir.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusyError(
            f"{workdir.root} is in use by another run ({holder or 'holder unknown'}); wait "
            "for it to finish, stop it, or train in another --workdir"
        ) from None
    try:
        stale = _holder(fd)
        if stale:
            print(f"note: {workdir.root} was locked by a run that is gone ({stale}); taking "
                  "it over", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)  # An empty lock file: released cleanly, nothing to take over.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    """``pid N on host H since T`` from a lock file's content ('' when empty)."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return ""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return text[:100]


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


# What defines a run: resuming with any of these changed would mix two runs in one workdir.
IDENTITY = ("model", "weights", "patch", "patch_rules", "head", "train_shared")


def check_resume(s: Setup, workdir: str | Workdir) -> None:
    """Refuses to resume the run in ``workdir`` with a config that defines another run: its
    model, weights, patch, datasets, task names, resolutions or class names differ from what the
    run saved. Called before anything is written (a resume that only checked shapes used to
    overwrite config.json, mix both datasets in metrics.jsonl and export the old weights under
    the new task's name). Schedule, logging and step counts may change."""
    workdir = as_workdir(workdir)
    if not os.path.exists(workdir.config):
        return  # A run from before config.json: nothing to compare.
    what = f"run {workdir.root}: {CONFIG_FILE}"
    saved = read_json(workdir.config, what, inside=workdir.root, error=WorkdirError)
    now = json.loads(s.config.to_json_best_effort())
    if not isinstance(saved, dict):
        raise WorkdirError(f"{what} is not a kfor1 run's config; restore it from the run")
    diffs = [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in IDENTITY
             if saved.get(key) != now.get(key)]

    def tasks(config: dict) -> list:
        return [(t.get("name"), t.get("dataset"), t.get("resolution"))
                for t in config.get("tasks", []) if isinstance(t, dict)]

    if tasks(saved) != tasks(now):
        diffs.append(f"tasks (name, dataset, resolution) {tasks(saved)} -> {tasks(now)}")
    elif os.path.exists(workdir.tasks):
        recorded = read_json(workdir.tasks, f"run {workdir.root}: {TASKS_FILE}",
                             inside=workdir.root, error=WorkdirError)
        for old, t in zip(recorded if isinstance(recorded, list) else [], s.tasks):
            names = list(t.info.class_names)
            if isinstance(old, dict) and old.get("class_names") != names:
                diffs.append(f"task {t.task.name!r} class names {old.get('class_names')} -> "
                             f"{names}")
    if diffs:
        raise WorkdirError(
            f"--workdir {workdir.root} holds another run (" + "; ".join(diffs)[:400] + "); "
            "resuming would mix the two: use a new --workdir, or resume with the run's own config")


def load_config(workdir: str | Workdir, model: str | None = None) -> ml_collections.ConfigDict:
    """The config a ``kfor1 train`` run saved in ``workdir``, read as hostile input: bounded,
    inside the workdir, and its model kfor1's or registered unless the user names the same
    ``model`` (``kfor1.models.registry.check_named_by_file``: a run directory may come from
    anyone, and nothing a file names is imported)."""
    workdir = as_workdir(workdir)
    if not os.path.exists(workdir.config):
        raise FileNotFoundError(
            f"{workdir.root} holds no {CONFIG_FILE}; is it the --workdir of a `kfor1 train` run?"
        )
    what = f"run {workdir.root}: {CONFIG_FILE}"
    data = read_json(workdir.config, what, inside=workdir.root, error=WorkdirError)
    if not isinstance(data, dict) or not isinstance(data.get("tasks", []), list) or not all(
            isinstance(t, dict) for t in data.get("tasks", [])):
        raise WorkdirError(f"{what} is not a kfor1 run's config (no object with a list of "
                           "tasks); restore it from the run")
    check_named_by_file(data.get("model"), what, named_by_user=model)
    # ConfigDict converts nested dicts but not dicts inside lists.
    data["tasks"] = [ml_collections.ConfigDict(t) for t in data.get("tasks", [])]
    return ml_collections.ConfigDict(data)


def _class_names(workdir: Workdir, config: ml_collections.ConfigDict) -> list[list[str]] | None:
    if not os.path.exists(workdir.tasks):
        return None  # A run from before tasks.json: the train splits give the classes.
    tasks = read_json(workdir.tasks, f"run {workdir.root}: {TASKS_FILE}", inside=workdir.root,
                      error=WorkdirError)
    if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("class_names"), list)
            and all(isinstance(c, str) for c in t["class_names"]) for t in tasks):
        raise WorkdirError(f"{workdir.tasks} is not a list of tasks with class names; restore "
                           "it from the run")
    if [t.get("name") for t in tasks] != [t.name for t in config.tasks]:
        raise ValueError(f"{workdir.tasks} and {workdir.config} name different tasks; "
                         "the workdir was edited by hand — restore both files")
    return [t["class_names"] for t in tasks]


def restore(workdir: str | Workdir, step: int | None = None,
            model: str | None = None) -> tuple[Setup, MultiTaskState]:
    """The run's eval-only setup and its state at ``step`` (default: the latest checkpoint);
    ``model``: the user model its config records, named by the user (``load_config``)."""
    workdir = as_workdir(workdir)
    config = load_config(workdir, model)
    config.progress = False
    names = _class_names(workdir, config)
    s = setup(config, train=names is None, class_names=names)
    checkpointer = Checkpointer(workdir.checkpoints)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir.checkpoints}; train first")
        template = s.init_state()
        state = checkpointer.restore(
            template, step, frozen=template.layout.frozen_paths(config.train_shared))
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
    return {t.task.name: export_task(s, state, i, workdir.patch(t.task.name), workdir)
            for i, t in enumerate(s.tasks)}


def export_task(s: Setup, state: MultiTaskState, i: int, directory: str,
                workdir: Workdir) -> str:
    """Task ``i``'s patch files in ``directory`` (its metadata from the run's setup)."""
    t = s.tasks[i]
    meta = task_meta(
        class_names=t.info.class_names, preprocessing=s.base.preprocessing,
        resolution=t.task.resolution, crop_fraction=s.eval_crop_fraction, spec=s.spec,
        model=s.config.model, weights=s.config.weights, source=s.base.source,
        dataset=t.info.name,
        trained_base=(os.path.relpath(workdir.base, directory)
                      if s.config.train_shared else None),
    )
    return export_patch(state, i, directory, meta)


def evaluate_workdir(workdir: str, step: int | None = None, model: str | None = None) -> Results:
    """Every task's test accuracy and loss at a checkpoint of the run in ``workdir``."""
    s, state = restore(workdir, step, model)
    return evaluate(s, state)


def export_workdir(workdir: str, out: str | None = None, step: int | None = None,
                   model: str | None = None) -> dict:
    """Patch files of every task from a checkpoint, under ``out`` (default: the workdir)."""
    s, state = restore(workdir, step, model)
    return export_patches(s, state, out or workdir)
