"""The trainer: a config and a workdir in, trained task patches out.

Workdir layout::

    metrics.jsonl          step, per-task train loss/accuracy, eval accuracy, learning rates, img/s
    events.out.tfevents.*  the same scalars for TensorBoard
    checkpoints/<step>/    orbax checkpoints (resumed automatically, a bounded number kept)
    patches/<task>/        one patch file per task (see kfor1.patchfile)
    config.json            the run's config (``kfor1 eval/export`` rebuild the run from it)
    summary.json           per task: eval accuracy, patch parameters, patch bytes; totals

Runs resume from the latest checkpoint: the data stream, the per-step random keys and the
learning-rate schedule are all functions of the step, so a resumed run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kfor1 import data as kdata
from kfor1.checkpoint import Checkpointer
from kfor1.commands import save_config
from kfor1.microbatch import TaskChunk
from kfor1.models import Pretrained, load_pretrained
from kfor1.multitask import MultiTaskState, Task, init_multitask, task_variables
from kfor1.optim import label_set, patch_optimizer
from kfor1.patchfile import export_patch
from kfor1.report import PatchReport, report
from kfor1.sharding import make_mesh, shard_batch
from kfor1.spec import SHARED, PatchSpec, partition
from kfor1.step import make_eval_step, make_train_step, resolution_groups

log = logging.getLogger("kfor1")


class TrainingError(RuntimeError):
    """Training cannot go on (for example, the loss became NaN); says what to change."""


@dataclasses.dataclass(frozen=True)
class TaskData:
    task: Task
    train: Any
    test: Any
    info: kdata.DatasetInfo


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs, built from a config (also used by eval and export)."""

    config: ml_collections.ConfigDict
    base: Pretrained
    model: Any
    labels: dict[str, Any]
    optimizer: optax.GradientTransformation
    schedules: dict[str, optax.Schedule]
    tasks: tuple[TaskData, ...]
    mesh: jax.sharding.Mesh


def _schedule(config: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    steps = max(int(config.num_steps), 1)
    warmup = min(int(config.warmup_steps), steps - 1)
    if config.schedule == "constant":
        return optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(
            peak)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, end_value=0.0)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(steps, peak)
    raise ValueError(f"config.schedule={config.schedule!r}; use cosine, constant or onecycle")


def _transform(config: ml_collections.ConfigDict, lr: optax.Schedule):
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(lr, momentum=config.momentum))
    raise ValueError(f"config.optimizer={config.optimizer!r}; use adamw, adam or sgd")


def build_optimizer(config: ml_collections.ConfigDict, labels: Any):
    """Per-group transforms with per-group learning rates from ``config.learning_rate``."""
    groups = sorted(label_set(labels) - {SHARED})
    rates = config.learning_rate
    missing = [g for g in groups + ([SHARED] if config.train_shared else []) if g not in rates]
    if missing:
        raise ValueError(
            f"config.learning_rate has no entry for {missing}; add e.g. "
            f"--config.learning_rate.{missing[0]}=1e-3"
        )
    schedules = {g: _schedule(config, float(rates[g])) for g in groups}
    transforms = {g: _transform(config, schedules[g]) for g in groups}
    shared_tx = None
    if config.train_shared:
        schedules[SHARED] = _schedule(config, float(rates[SHARED]))
        shared_tx = _transform(config, schedules[SHARED])
    return patch_optimizer(transforms, labels, shared_tx=shared_tx), schedules


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Loads the base, the data and the patch spec, and builds the optimiser."""
    if config.num_steps < 1 or config.batch_size < 1:
        raise ValueError("config.num_steps and config.batch_size must be positive")
    if not config.tasks:
        raise ValueError("config.tasks is empty; give at least one task")
    task_chunk(config.task_chunk)  # A bad value fails here, before any data loads.
    model_kwargs: dict[str, Any] = {"conv_impl": config.conv_impl}
    if config.dtype != "float32":
        model_kwargs["dtype"] = jnp.dtype(config.dtype)
    if config.dropout_rate >= 0:
        model_kwargs["dropout_rate"] = float(config.dropout_rate)
    if config.bn_momentum >= 0:
        model_kwargs["bn_momentum"] = float(config.bn_momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # The 1000-class head stays; tasks get their own.
        base = load_pretrained(config.model, path=config.weights or None, **model_kwargs)
    tasks = []
    for t in config.tasks:
        # Undecoded: shuffling and resuming (skip) then work on paths/bytes, not pixels.
        train_ds, info = kdata.load_source(
            t.dataset, "train", data_dir=config.data_dir or None, seed=config.seed, decode=False
        )
        test_ds, _ = kdata.load_source(t.dataset, "test", data_dir=config.data_dir or None)
        resolution = int(t.resolution) or base.preprocessing.resolution
        tasks.append(TaskData(Task(t.name, info.num_classes, resolution), train_ds, test_ds, info))
    spec = PatchSpec.parse(config.patch, head=config.head or None)
    labels = partition(base.variables, spec, groups=True)
    optimizer, schedules = build_optimizer(config, labels)
    mesh = make_mesh(config.mesh.tasks, config.mesh.data or None)
    shards = mesh.shape["data"]
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % shards:
            raise ValueError(
                f"config.{key}={config[key]} does not split over the mesh's {shards}-way 'data' "
                f"axis; use a multiple of {shards} or set --config.mesh.data to a divisor"
            )
    return Setup(config, base, base.model, labels, optimizer, schedules, tuple(tasks), mesh)


def task_chunk(value: int) -> TaskChunk:
    """``config.task_chunk`` as ``make_train_step`` takes it: 0 auto, -1 all tasks, n > 0."""
    if value == 0:
        return "auto"
    if value == -1:
        return None
    if value > 0:
        return int(value)
    raise ValueError(
        f"config.task_chunk={value}: use 0 (auto), -1 (all tasks at once) or a positive number "
        "of tasks per chunk"
    )


def init_state(s: Setup) -> MultiTaskState:
    return init_multitask(
        s.base.variables, s.labels, [t.task for t in s.tasks], s.optimizer,
        head=s.config.head or None, mesh=s.mesh,
    )


def _train_iterators(s: Setup, start_step: int) -> list[Iterator[dict[str, np.ndarray]]]:
    pre = s.base.preprocessing
    augment = kdata.Augment(**s.config.augment.to_dict())
    local_batch = s.config.batch_size // jax.process_count()
    return [
        kdata.train_batches(
            t.train, resolution=t.task.resolution, mean=pre.mean, std=pre.std,
            batch_size=local_batch, seed=s.config.seed + 1000 * i, augment=augment,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for i, t in enumerate(s.tasks)
    ]


def _group(batches: Sequence[dict[str, np.ndarray]], groups, mesh) -> tuple[Any, ...]:
    return tuple(
        shard_batch(kdata.stack_tasks([batches[i] for i in g]), mesh) for g in groups
    )


def eval_crop_fraction(s: Setup) -> float:
    """Training on whole images ('pad'/'none' crops) is evaluated on whole images too."""
    return 1.0 if s.config.augment.crop in ("pad", "none") else s.base.preprocessing.crop_fraction


def evaluate(s: Setup, state: MultiTaskState, eval_step=None) -> dict[str, dict[str, float]]:
    """Accuracy and loss of every task on its test split (all tasks in one compiled step)."""
    model = s.model.clone(num_classes=state.layout.max_classes)
    eval_step = eval_step or make_eval_step(model)
    pre = s.base.preprocessing
    limit = int(s.config.max_eval_examples)
    iterators = []
    for t in s.tasks:
        ds = t.test.take(limit) if limit else t.test
        iterators.append(kdata.eval_batches(
            ds, resolution=t.task.resolution, mean=pre.mean, std=pre.std,
            batch_size=s.config.eval_batch_size, crop_fraction=eval_crop_fraction(s),
            process_index=jax.process_index(), process_count=jax.process_count(),
        ))
    groups = resolution_groups(state.layout)
    totals = {k: np.zeros(len(s.tasks)) for k in ("loss_sum", "correct", "count")}
    empty: list[dict[str, np.ndarray] | None] = [None] * len(s.tasks)
    while True:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            break
        for i, b in enumerate(batches):
            if b is not None and empty[i] is None:
                empty[i] = {k: np.zeros_like(v) for k, v in b.items()}
        batches = [b if b is not None else empty[i] for i, b in enumerate(batches)]
        out = jax.device_get(eval_step(state, _group(batches, groups, s.mesh)))
        for k in totals:
            totals[k] += np.asarray(out[k])
    return {
        t.task.name: {
            "accuracy": float(totals["correct"][i] / max(totals["count"][i], 1)),
            "loss": float(totals["loss_sum"][i] / max(totals["count"][i], 1)),
            "examples": int(totals["count"][i]),
        }
        for i, t in enumerate(s.tasks)
    }


class MetricsLog:
    """``metrics.jsonl`` plus clu's writers (TensorBoard); resumed runs drop stale lines."""

    def __init__(self, workdir: str, resume_step: int):
        from clu import metric_writers

        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip()
                        and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.writer.write_scalars(step, scalars)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _check_finite(step: int, metrics: dict[str, np.ndarray], s: Setup, ckpt: Checkpointer):
    bad = [t.task.name for t, loss in zip(s.tasks, metrics["loss"]) if not math.isfinite(loss)]
    if bad:
        last = ckpt.latest_step()
        raise TrainingError(
            f"the training loss became NaN/inf at step {step} for task(s) {bad}; lower the "
            f"learning rates (config.learning_rate.*, now {dict(s.config.learning_rate)}) or "
            f"raise warmup_steps. "
            + (f"The last good checkpoint (step {last}) is kept." if last is not None
               else "No checkpoint was written.")
        )


def export_patches(s: Setup, state: MultiTaskState, workdir: str) -> dict[str, str]:
    """Writes ``patches/<task>/`` for every task; returns their directories."""
    out = {}
    for i, t in enumerate(s.tasks):
        meta = {
            "class_names": list(t.info.class_names),
            "preprocessing": {**s.base.preprocessing.to_dict(), "resolution": t.task.resolution,
                              "crop_fraction": eval_crop_fraction(s)},
            "spec": PatchSpec.parse(s.config.patch).describe(),
            "base": {"model": s.config.model, "weights": s.config.weights or "packaged",
                     "source": os.path.basename(s.base.source)},
            "dataset": t.info.name,
        }
        out[t.task.name] = export_patch(state, i, os.path.join(workdir, "patches", t.task.name),
                                        meta)
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns the summary (also summary.json).

    ``stop_at_step`` ends the run early after checkpointing, as a preemption would.
    """
    if config.distributed:
        jax.distributed.initialize()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    s = setup(config)
    save_config(config, workdir)
    state = init_state(s)
    # Sized for the tasks: their heads, not the 1000-class ImageNet head.
    task_report = report(task_variables(state, 0), state.layout.labels)
    print(task_report)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        start = int(jax.device_get(state.step))
        print(f"resumed from {ckpt.directory} at step {start}")
    metrics_log = MetricsLog(workdir, start)
    model = s.model.clone(num_classes=state.layout.max_classes)
    step_fn = make_train_step(model, s.optimizer, train_shared=config.train_shared,
                              task_chunk=task_chunk(config.task_chunk))
    eval_step = make_eval_step(model)
    groups = resolution_groups(state.layout)
    iterators = _train_iterators(s, start)
    key = jax.random.key(config.seed)
    names = [t.task.name for t in s.tasks]
    end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)
    progress = _progress(config, start, end)
    images = 0
    clock = time.perf_counter()
    try:
        for step in range(start + 1, end + 1):
            batch = _group([next(it) for it in iterators], groups, s.mesh)
            state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
            images += config.batch_size * len(s.tasks)
            if step % config.log_every == 0 or step == config.num_steps:
                metrics = jax.device_get(metrics)
                _check_finite(step, metrics, s, ckpt)
                elapsed = time.perf_counter() - clock
                scalars = {f"lr/{g}": float(f(step - 1)) for g, f in s.schedules.items()}
                for i, name in enumerate(names):
                    scalars[f"train/loss/{name}"] = float(metrics["loss"][i])
                    scalars[f"train/accuracy/{name}"] = float(metrics["accuracy"][i])
                scalars["images_per_s"] = images / max(elapsed, 1e-9)
                metrics_log.write(step, scalars)
                progress.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.3f}")
                images, clock = 0, time.perf_counter()
            progress.update(1)
            if config.eval_every and step % config.eval_every == 0 and step != end:
                _log_eval(metrics_log, step, evaluate(s, state, eval_step))
            if step % config.checkpoint_every == 0 or step == end:
                ckpt.save(state)
    except KeyboardInterrupt:
        ckpt.save(state, force=True)
        ckpt.close()
        raise
    finally:
        progress.close()
    ckpt.close()
    if end < config.num_steps:
        metrics_log.close()
        return {"stopped_at_step": end}
    results = evaluate(s, state, eval_step)
    _log_eval(metrics_log, end, results)
    metrics_log.close()
    patches = export_patches(s, state, workdir)
    summary = _summary(s, task_report, results, patches)
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def _log_eval(metrics_log: MetricsLog, step: int, results: dict[str, dict[str, float]]) -> None:
    metrics_log.write(step, {f"eval/accuracy/{n}": r["accuracy"] for n, r in results.items()})


def _summary(s: Setup, task_report: PatchReport, results, patches: dict[str, str]):
    tasks = {}
    for t in s.tasks:
        path = patches[t.task.name]
        with open(os.path.join(path, "patch.json"), encoding="utf-8") as f:
            meta = json.load(f)
        tasks[t.task.name] = {
            **results[t.task.name], "num_classes": t.task.num_classes,
            "patch_parameters": meta["patch_parameters"],
            "patch_statistics": meta["patch_statistics"],
            "patch_file_bytes": _dir_bytes(path), "patch_dir": path,
        }
    return {
        "model": s.config.model,
        "patch": PatchSpec.parse(s.config.patch).describe(),
        "tasks": tasks,
        "totals": {
            # Of the first task's model (its head, not ImageNet's).
            "base_parameters": task_report.total_parameters,
            "patch_parameters": sum(t["patch_parameters"] for t in tasks.values()),
            "patch_file_bytes": sum(t["patch_file_bytes"] for t in tasks.values()),
            "patch_fraction": task_report.patch_fraction,
            "mean_accuracy": float(np.mean([t["accuracy"] for t in tasks.values()])),
        },
    }


def _progress(config: ml_collections.ConfigDict, start: int, end: int):
    from tqdm import tqdm  # Plain text: tqdm.auto needs ipywidgets in notebooks.

    return tqdm(
        total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
        disable=not config.progress or jax.process_index() > 0,
    )
