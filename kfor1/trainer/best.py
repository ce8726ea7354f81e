"""``config.keep_best``: each task's patch from the evaluation with its best validation
accuracy, as Keras's ``save_best_only`` and timm's checkpoint saver keep the best model.

Why per task: K tasks trained together peak at different steps, and a patch is a task's own
file, so each task gets its own best. Each periodic validation that improves a task's
accuracy writes that task's patch to ``<workdir>/best/<task>/`` and its step to
``best/best.json`` (so a resumed run keeps what it found); at the end, the tasks whose best is
not the last step start from their best patch again (``start_from_patch``), and the test
evaluation, ``patches/`` and ``summary.json`` (``patch_step``) are of those patches.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from kfor1.files.atomic import atomic_write
from kfor1.files.patchfile import load_patch, start_from_patch
from kfor1.multitask.state import MultiTaskState
from kfor1.trainer.evaluate import Results
from kfor1.trainer.experiment import Setup
from kfor1.trainer.workdir import Workdir, export_task
from kfor1.untrusted import UntrustedFileError, read_json

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestPatches:
    """The best validation accuracy of each task so far, its step and its patch files."""

    def __init__(self, s: Setup, wd: Workdir):
        self.s, self.wd = s, wd
        self.directory = os.path.join(wd.root, BEST_DIR)
        self.file = os.path.join(self.directory, BEST_FILE)
        self.best: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.file):
            found = read_json(self.file, f"the best-patch record {self.file}",
                              inside=self.directory)
            names = {t.task.name for t in s.tasks}
            try:
                self.best = {n: {"step": int(b["step"]),
                                 "val_accuracy": float(b["val_accuracy"])}
                             for n, b in found.items() if n in names}
            except (AttributeError, KeyError, TypeError, ValueError):
                raise UntrustedFileError(
                    f"{self.file} is not a best-patch record ({{task: {{step, val_accuracy}}}});"
                    f" delete {self.directory} to choose again from this run's later "
                    "evaluations") from None

    def update(self, step: int, state: MultiTaskState, validation: Results) -> None:
        """Records (and writes the patch of) each task whose validation accuracy at ``step``
        is higher than at any earlier evaluation."""
        changed = False
        for i, t in enumerate(self.s.tasks):
            name, accuracy = t.task.name, float(validation[t.task.name]["accuracy"])
            if name in self.best and accuracy <= self.best[name]["val_accuracy"]:
                continue
            if jax.process_index() == 0:  # Process 0 writes the run's files.
                export_task(self.s, state, i, os.path.join(self.directory, name), self.wd)
            self.best[name] = {"step": int(step), "val_accuracy": accuracy}
            changed = True
        if changed and jax.process_index() == 0:
            atomic_write(self.file, json.dumps(self.best, indent=2) + "\n")

    def swap_in(self, state: MultiTaskState, last_step: int) -> tuple[MultiTaskState,
                                                                     dict[str, int]]:
        """``state`` with each task's best patch in its slot; and each task's patch step."""
        steps = {}
        for i, t in enumerate(self.s.tasks):
            name = t.task.name
            best = self.best.get(name)
            if best is None or best["step"] == last_step:
                steps[name] = last_step
                continue
            patch = load_patch(os.path.join(self.directory, name))
            state, _ = start_from_patch(state, i, patch, self.s.base.variables,
                                        what=f"the best patch of task {name!r}")
            steps[name] = best["step"]
        return state, steps
