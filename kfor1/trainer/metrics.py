"""What a run reports: ``metrics.jsonl`` and TensorBoard scalars while it trains, and the summary
it ends with. Plain data in, plain data out: nothing here knows the trainer.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kfor1.errors import UserError
from kfor1.files.atomic import atomic_write
from kfor1.patch.report import PatchReport


class MetricsFileError(UserError, ValueError):
    """A ``metrics.jsonl`` whose lines are not the records kfor1 writes."""


def _kept_lines(path: str, resume_step: int) -> list[str]:
    """The lines of ``path`` up to ``resume_step``. A last line cut short (the run was killed
    while writing it) is dropped with a note; a bad line before it is refused, named."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(step)
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                print(f"note: {path}: dropped its last line, cut short when the run stopped "
                      f"({line[:60]!r})", file=sys.stderr)
                continue
            raise MetricsFileError(
                f"{path} line {n} is not a metrics record ({line[:60]!r}); move the file aside "
                "and the run starts its log anew") from None
        if step <= resume_step:
            kept.append(line + "\n")
    return kept


class MetricsLog:
    """Appends ``{"step": ..., **scalars}`` lines to a JSONL file and writes the same scalars
    with clu's writers (TensorBoard events in ``events_dir``).

    A resumed run drops the lines and TensorBoard events after its resume step (a run killed
    after its last checkpoint logged steps it will log again), so both read as if the run had
    never stopped. Only process 0 writes them.
    """

    def __init__(self, path: str, events_dir: str, resume_step: int):
        from clu import metric_writers

        self.path = path
        if os.path.exists(path) and jax.process_index() == 0:
            atomic_write(path, "".join(_kept_lines(path, resume_step)))
        if jax.process_index() == 0:
            for events in glob.glob(os.path.join(events_dir, "events.out.tfevents.*")):
                _truncate_events(events, resume_step)
        self.writer = metric_writers.create_default_writer(
            events_dir, just_logging=jax.process_index() > 0
        )

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.writer.write_scalars(step, dict(scalars))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _truncate_events(path: str, last_step: int) -> None:
    """Rewrites a TensorBoard event file without its events after ``last_step`` (an event file
    is TFRecords of ``Event`` protos; the file-version record at step 0 is kept)."""
    import tensorflow as tf

    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    kept = [r for r in records if tf.compat.v1.Event.FromString(r).step <= last_step]
    if len(kept) == len(records):
        return
    tmp = f"{path}.tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in kept:
            writer.write(record)
    os.replace(tmp, path)


def train_scalars(
    names: Sequence[str], metrics: Mapping[str, np.ndarray], learning_rates: Mapping[str, float],
    images_per_s: float | None,
) -> dict[str, float]:
    """One logged training step: ``lr/<group>``, ``train/{loss,accuracy}/<task>``,
    ``images_per_s``; ``metrics`` holds per-task (K,) ``loss`` and ``accuracy``.

    ``images_per_s`` is over the steps since the last log, never a process's first step (which
    compiles); None (a log of that first step alone) leaves it out."""
    scalars = {f"lr/{g}": float(lr) for g, lr in learning_rates.items()}
    for i, name in enumerate(names):
        scalars[f"train/loss/{name}"] = float(metrics["loss"][i])
        scalars[f"train/accuracy/{name}"] = float(metrics["accuracy"][i])
    if images_per_s is not None:
        scalars["images_per_s"] = float(images_per_s)
    return scalars


def eval_scalars(
    results: Mapping[str, Mapping[str, float]], split: str = "test"
) -> dict[str, float]:
    """``eval/accuracy/<task>`` (the test split) or ``val/accuracy/<task>`` (the validation
    split) of ``kfor1.trainer.evaluate.evaluate``'s results: the key says which split it comes
    from."""
    prefix = "eval" if split == "test" else "val"
    return {f"{prefix}/accuracy/{name}": r["accuracy"] for name, r in results.items()}


def validation_source(validation: float | str) -> str:
    """Where validation accuracy comes from, for ``summary.json`` and ``sweep.json``:
    ``validation`` is ``kfor1.data.parse_validation(config.validation)``."""
    if isinstance(validation, str):
        return "validation: the source's own validation split"
    return f"validation: {validation:g} of train, stratified and seeded, held out of training"


def summary(
    *, model: str, spec: Any, task_report: PatchReport,
    results: Mapping[str, Mapping[str, float]] | None, num_classes: Mapping[str, int],
    patch_files: Mapping[str, Mapping[str, Any]],
    skipped_images: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    validation: Mapping[str, Mapping[str, float]] | None = None,
    validation_fraction: float | str = 0.0,
) -> dict[str, Any]:
    """The run's ``summary.json``: per task its eval results, class count and patch file
    (``kfor1.files.patchfile.describe``), the images it left out per split (``skipped_images``:
    ``{"train": {"count", "files"}}``, ``config.skip_bad_images``), and totals;
    ``task_report`` is of the first task's model (its head, not ImageNet's). ``accuracy`` is
    on the test split; with a ``validation`` split, ``val_accuracy`` and ``val_loss`` too, and
    ``splits`` says where each comes from. ``results`` is None for a run that never read its
    test split (``config.evaluate_test=False``): it has the validation results only."""
    skipped_images = skipped_images or {}
    if results is None and not validation:
        raise ValueError("a summary needs test results, validation results or both")
    tasks = {
        name: {**(results[name] if results else {"examples": validation[name]["examples"]}),
               "num_classes": num_classes[name], **patch_files[name],
               "skipped_images": {split: {"count": len(files), "files": list(files)}
                                  for split, files in skipped_images.get(name, {}).items()}}
        for name in (results or validation)
    }
    splits = {"accuracy": "test"} if results else {}
    if validation:
        for name, t in tasks.items():
            t["val_accuracy"] = validation[name]["accuracy"]
            t["val_loss"] = validation[name]["loss"]
            t["val_examples"] = validation[name]["examples"]
        splits["val_accuracy"] = validation_source(validation_fraction)
    return {
        "model": model,
        "splits": splits,
        "patch": spec,
        "tasks": tasks,
        "totals": {
            "base_parameters": task_report.total_parameters,
            "patch_parameters": sum(t["patch_parameters"] for t in tasks.values()),
            "patch_file_bytes": sum(t["patch_file_bytes"] for t in tasks.values()),
            "patch_fraction": task_report.patch_fraction,
            **({"mean_accuracy": float(np.mean([t["accuracy"] for t in tasks.values()]))}
               if results else {}),
        },
    }
