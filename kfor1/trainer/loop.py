"""The trainer: a config and a workdir in, trained task patches out.

``train`` reads top-down in the data's order: the setup (base, data, spec, optimiser, mesh), the
state (resumed from the latest checkpoint if there is one), the compiled step, the loop with
its metrics and checkpoints, then the final evaluation, the patch files and the summary. The
workdir's layout is in ``kfor1.trainer.workdir``.

Runs resume from the latest checkpoint: the data stream, the per-step random keys and the
learning-rate schedule are all functions of the step, so a resumed run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from kfor1 import data as kdata
from kfor1.errors import TrainingError
from kfor1.files.atomic import DiskFullError
from kfor1.files.patchfile import describe, load_patch, start_from_patch
from kfor1.multitask.state import task_variables
from kfor1.multitask.step import make_eval_step, make_train_step
from kfor1.multitask.task_axis import resolution_groups
from kfor1.patch.report import report
from kfor1.trainer import distributed
from kfor1.trainer.adabn import reestimate_stats
from kfor1.trainer.best import BestPatches
from kfor1.trainer.checkpoint import Checkpointer
from kfor1.trainer.evaluate import evaluate, group_batches
from kfor1.trainer.experiment import Setup, setup
from kfor1.trainer.health import Guard, Interrupted, stop_signals
from kfor1.trainer.memory import check_step_memory
from kfor1.trainer.metrics import MetricsLog, eval_scalars, summary, train_scalars
from kfor1.trainer.workdir import Workdir, check_resume, export_patches, locked, save_run

__all__ = ["TrainingError", "train"]


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns the summary (also summary.json).

    ``stop_at_step`` ends the run early after checkpointing, as a preemption would; the result
    is then ``{"stopped_at_step": step}``.
    """
    distributed.initialize(config)
    wd = Workdir(workdir)
    if os.path.exists(wd.root) and not os.path.isdir(wd.root):
        raise ValueError(f"--workdir {wd.root} is a file; give a directory (new, or a run's "
                         "to resume it)")
    s = setup(config)
    with locked(wd):
        return _train(s, wd, stop_at_step)


def _train(s: Setup, wd: Workdir, stop_at_step: int | None) -> dict[str, Any]:
    config = s.config
    state = s.init_state()
    for i, t in enumerate(config.tasks):
        if t.get("init_patch", ""):
            state, notes = start_from_patch(state, i, load_patch(t.init_patch), s.base.variables,
                                            what=f"init_patch {t.init_patch}")
            print(f"task {t.name!r} starts from the patch in {t.init_patch}")
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
    # Sized for the tasks: their heads, not the 1000-class ImageNet head.
    task_report = report(task_variables(state, 0), state.layout.labels, s.spec)
    print(task_report)
    ckpt = Checkpointer(wd.checkpoints, keep=config.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        check_resume(s, wd)  # Before anything of the run is read or written.
        state = ckpt.restore(state, quarantine=True,
                             frozen=state.layout.frozen_paths(config.train_shared))
        start = int(jax.device_get(state.step))
        print(f"resumed from {ckpt.directory} at step {start}")
    elif s.spec.estimates_stats:
        print(f"{'stats' if s.spec.owns_all_stats else 'input_stats'}: estimating each task's "
              f"BatchNorm statistics on up to "
              f"{int(config.stats_images):,} of its training images")
        state = reestimate_stats(s, state)
    # Only now: a resume that the checkpoint refuses must leave the run's config.json as it was.
    if jax.process_index() == 0:
        save_run(s, wd)

    model = s.model.clone(num_classes=state.layout.max_classes)
    step_fn = make_train_step(model, s.optimizer, train_shared=config.train_shared,
                              task_chunk=s.task_chunk, label_smoothing=config.label_smoothing)
    eval_step = make_eval_step(model)
    groups = resolution_groups(state.layout)
    iterators = _train_iterators(s, start)
    key = jax.random.key(config.seed)
    names = [t.task.name for t in s.tasks]
    end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)

    first = None
    if start < end:  # Compiled now, so that a step that cannot fit is refused before it runs.
        first = group_batches([next(it) for it in iterators], groups, s.mesh)
        step_fn = _compile(s, step_fn, state, first, key)

    metrics_log = MetricsLog(wd.metrics, wd.root, start)
    progress = _progress(config, start, end)
    images, clock = 0, time.perf_counter()
    guard = Guard(s, ckpt)
    best = BestPatches(s, wd) if config.keep_best else None
    periodic = "validation" if s.tasks[0].val is not None else "test"
    try:
        with stop_signals() as stop:
            for step in range(start + 1, end + 1):
                if first is not None:
                    batch, first = first, None
                else:
                    batch = group_batches([next(it) for it in iterators], groups, s.mesh)
                state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
                # The previous step's health, read while this one runs: no stall per step.
                guard.check()
                guard.push(step, metrics, state)
                if step == start + 1:
                    # The first step warms up (allocations, caches): images/s starts after it.
                    jax.block_until_ready(metrics)
                    images, clock = 0, time.perf_counter()
                else:
                    images += config.batch_size * len(s.tasks)
                if step % config.log_every == 0 or step == config.num_steps:
                    metrics = jax.device_get(metrics)
                    rates = {g: f(step - 1) for g, f in s.schedules.items()}
                    rate = images / max(time.perf_counter() - clock, 1e-9) if images else None
                    metrics_log.write(step, train_scalars(names, metrics, rates, rate))
                    progress.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.3f}")
                    images, clock = 0, time.perf_counter()
                progress.update(1)
                if config.eval_every and step % config.eval_every == 0 and step != end:
                    # The test split is for the final evaluation when there is a validation one.
                    periodic_results = evaluate(s, state, eval_step, split=periodic)
                    metrics_log.write(step, eval_scalars(periodic_results, periodic))
                    if best is not None:
                        best.update(step, state, periodic_results)
                if step % config.checkpoint_every == 0 or step == end or stop["signal"]:
                    guard.check()  # Only a healthy state is ever checkpointed.
                    ckpt.save(state, force=bool(stop["signal"]))
                if stop["signal"]:
                    raise Interrupted(
                        f"{stop['signal']} received: stopped after step {step}, checkpoint "
                        f"saved in {ckpt.directory}; run the same command to resume from it"
                    )
    except KeyboardInterrupt:  # A second Ctrl-C: the step in flight may hold donated arrays.
        ckpt.close()
        raise
    except (TrainingError, DiskFullError):
        ckpt.close()  # Pending saves of healthy states complete before the error is shown.
        metrics_log.close()
        raise
    finally:
        progress.close()
    ckpt.close(state)  # A last checkpoint lost to a deleted directory is written again.
    if end < config.num_steps:
        metrics_log.close()
        return {"stopped_at_step": end}

    patch_steps = None
    if best is not None:  # The exported patches, and what is reported of them, are the best.
        best.update(end, state, evaluate(s, state, eval_step, split="validation"))
        state, patch_steps = best.swap_in(state, end)
    results = evaluate(s, state, eval_step) if config.evaluate_test else None
    validation = evaluate(s, state, eval_step, split="validation") if periodic != "test" else None
    metrics_log.write(end, {**(eval_scalars(results) if results else {}),
                            **(eval_scalars(validation, "validation") if validation else {})})
    metrics_log.close()
    if jax.process_index() > 0:  # Process 0 writes the run's files.
        return {"process_index": jax.process_index(), "results": results}
    patches = export_patches(s, state, wd)
    out = summary(
        model=config.model, spec=s.spec.describe(), task_report=task_report, results=results,
        num_classes={t.task.name: t.task.num_classes for t in s.tasks},
        patch_files={name: describe(path) for name, path in patches.items()},
        skipped_images={t.task.name: t.info.skipped for t in s.tasks},
        validation=validation, validation_fraction=kdata.parse_validation(config.validation),
    )
    for name, step in (patch_steps or {}).items():
        out["tasks"][name]["patch_step"] = step
    with open(wd.summary, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return out


def _compile(s: Setup, step_fn: Any, state: Any, batch: Any, key: jax.Array) -> Any:
    """The train step compiled for these shapes (what its first call would compile), its
    memory checked against what the machine has (``kfor1.trainer.memory``)."""
    compiled = step_fn.lower(state, batch, jax.random.fold_in(key, 0)).compile()
    sizes = sorted({t.task.resolution for t in s.tasks})
    check_step_memory(
        compiled,
        f"the training step ({len(s.tasks)} task(s) x {s.config.batch_size} images at "
        f"{'/'.join(map(str, sizes))} px)",
        "lower config.batch_size or the tasks' resolution" + (
            ", or set config.task_chunk (tasks run at a time)" if len(s.tasks) > 1 else ""))
    return compiled


def _train_iterators(s: Setup, start_step: int) -> list[Iterator[dict[str, np.ndarray]]]:
    pre = s.base.preprocessing
    augment = kdata.Augment(**s.config.augment.to_dict())
    local_batch = s.config.batch_size // jax.process_count()
    return [
        kdata.train_batches(
            t.train, resolution=t.task.resolution, mean=pre.mean, std=pre.std,
            batch_size=local_batch, seed=s.config.seed + 1000 * i, augment=augment,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(), cache=bool(s.config.cache_images),
        )
        for i, t in enumerate(s.tasks)
    ]


def _progress(config: ml_collections.ConfigDict, start: int, end: int):
    from tqdm import tqdm  # Plain text: tqdm.auto needs ipywidgets in notebooks.

    return tqdm(
        total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
        disable=not config.progress or jax.process_index() > 0,
    )
