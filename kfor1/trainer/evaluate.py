"""Accuracy and loss of every task on its test (or validation) split, all tasks in one compiled
step, and the batch grouping the training loop shares with it.

The splits are read once, in fixed-size batches (the last one padded and masked); a task
whose split is exhausted early gets masked-out batches, so the compiled step sees one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kfor1 import data as kdata
from kfor1.multitask.sharding import shard_batch
from kfor1.multitask.state import MultiTaskState
from kfor1.multitask.step import make_eval_step
from kfor1.multitask.task_axis import resolution_groups
from kfor1.trainer.experiment import Setup

Results = dict[str, dict[str, float]]


def group_batches(
    batches: Sequence[dict[str, np.ndarray]], groups: Sequence[Sequence[int]], mesh: Any
) -> tuple[Any, ...]:
    """Per-task batches (task order) as the step takes them: stacked to (K_g, B, ...) per
    resolution group and placed on the mesh."""
    return tuple(
        shard_batch(kdata.stack_tasks([batches[i] for i in g]), mesh) for g in groups
    )


SPLITS = ("test", "validation")


def evaluate(
    s: Setup, state: MultiTaskState, eval_step: Any = None, split: str = "test"
) -> Results:
    """``{task: {"accuracy", "loss", "examples"}}`` over each task's ``split``: 'test', or
    'validation' (held out of train by ``config.validation``); at most
    ``config.max_eval_examples`` examples each (0 = all).

    ``eval_step`` is a ``make_eval_step`` of the state's model, to reuse one already compiled.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    sources = [t.test if split == "test" else t.val for t in s.tasks]
    if any(ds is None for ds in sources):
        raise ValueError(f"this setup has no {split} split" + (
            " (config.validation holds one out of each task's train split)"
            if split == "validation" else " (config.evaluate_test=False)"))
    model = s.model.clone(num_classes=state.layout.max_classes)
    eval_step = eval_step or make_eval_step(model)
    pre = s.base.preprocessing
    limit = int(s.config.max_eval_examples)
    iterators = [
        kdata.eval_batches(
            ds.take(limit) if limit else ds, resolution=t.task.resolution,
            mean=pre.mean, std=pre.std, batch_size=s.config.eval_batch_size,
            crop_fraction=s.eval_crop_fraction, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for t, ds in zip(s.tasks, sources)
    ]
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
        out = jax.device_get(eval_step(state, group_batches(batches, groups, s.mesh)))
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
