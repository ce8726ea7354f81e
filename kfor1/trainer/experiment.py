"""A config resolved into what a run is made of: the base model with its weights, each task's
data, the parsed patch spec and its labels, the optimiser and the device mesh.

``setup`` checks every config value that can be checked before anything loads, then loads the
base and the data, so a mistake costs seconds, not a training run. The trainer, ``kfor1 eval``
and ``kfor1 export`` all start here; the latter two with ``train=False``, which never opens a
task's train split (its classes come from the run's ``tasks.json``, see ``kfor1.trainer.workdir``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kfor1 import data as kdata
from kfor1.microbatch import TaskChunk
from kfor1.models import Pretrained, get_entry, load_pretrained
from kfor1.models.registry import MIN_RESOLUTION
from kfor1.multitask.sharding import make_mesh
from kfor1.multitask.state import MultiTaskState, Task, init_multitask
from kfor1.patch.optim import build_optimizer
from kfor1.patch.spec import PatchSpec, partition
from kfor1.trainer.config import ConfigError
from kfor1.trainer.config_ranges import check_ranges
from kfor1.untrusted import check_name


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task: its engine description, what its data holds, and its splits (``train`` is None
    in an eval-only setup)."""

    task: Task
    info: kdata.DatasetInfo
    test: Any  # None in a run that never opens it (config.evaluate_test=False).
    train: Any = None
    val: Any = None  # Held out of train (config.validation), or None.


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs, built once from a config by ``setup``."""

    config: ml_collections.ConfigDict
    base: Pretrained
    spec: PatchSpec
    labels: dict[str, Any]
    optimizer: optax.GradientTransformation
    schedules: dict[str, optax.Schedule]
    tasks: tuple[TaskData, ...]
    mesh: jax.sharding.Mesh
    task_chunk: TaskChunk

    @property
    def model(self) -> Any:
        return self.base.model

    @property
    def eval_crop_fraction(self) -> float:
        """Training on whole images ('pad'/'none' crops) is evaluated on whole images too."""
        if self.config.augment.crop in ("pad", "none"):
            return 1.0
        return self.base.preprocessing.crop_fraction

    def init_state(self) -> MultiTaskState:
        """The K-task state at step 0: base weights, fresh heads, optimiser state."""
        return init_multitask(
            self.base.variables, self.labels, [t.task for t in self.tasks], self.optimizer,
            head=self.spec.head, mesh=self.mesh, spec=self.spec,
        )


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


# The config's model options at their defaults: a user model whose factory does not take one
# simply does without it; set to anything else, it is a config mistake.
_OPTION_DEFAULTS = {"conv_impl": "auto", "bn_momentum": 0.9}


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model fields the config sets (``conv_impl``, ``dtype``, ``dropout_rate``, ...); for a
    user model, those its factory accepts (an option it does not take must stay at its
    default)."""
    kwargs: dict[str, Any] = {"conv_impl": config.conv_impl}
    if config.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.dtype)
    if config.dropout_rate >= 0:
        kwargs["dropout_rate"] = float(config.dropout_rate)
    if config.bn_momentum >= 0:
        kwargs["bn_momentum"] = float(config.bn_momentum)
    entry = get_entry(config.model)
    if not entry.user:
        return kwargs
    accepted = {}
    for key, value in kwargs.items():
        if entry.accepts(key):
            accepted[key] = value
        elif key not in _OPTION_DEFAULTS or _OPTION_DEFAULTS[key] != value:
            raise ConfigError(
                f"config.{key}={config[key]!r}: model {config.model!r} takes no {key!r} "
                f"argument; leave config.{key} at its default or add {key} to its factory"
            )
    return accepted


def load_base(config: ml_collections.ConfigDict) -> Pretrained:
    """``config.model`` with ``config.weights`` (or its packaged ones) and the model options."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # The 1000-class head stays; tasks get their own.
        return load_pretrained(config.model, path=config.weights or None,
                               **model_kwargs(config))


def check_values(config: ml_collections.ConfigDict) -> tuple[TaskChunk, PatchSpec]:
    """The checks that need nothing loaded: step and batch counts, tasks, ``task_chunk``, the
    patch spec (parsed here, once). Returns the task chunk and the spec."""
    check_ranges(config)
    for t in config.tasks:
        check_name(t.name, f"task {t.dataset!r}: its name (config.tasks[].name)",
                   error=ConfigError)
        start = t.get("init_patch", "")
        if start and not os.path.isfile(os.path.join(start, "patch.json")):
            raise ConfigError(f"task {t.name or t.dataset!r}: init_patch={start!r} is not a "
                              "patch directory (one of a run's patches/<task>/)")
        if t.resolution and t.resolution < MIN_RESOLUTION:
            raise ConfigError(f"task {t.name or t.dataset!r}: resolution={t.resolution} is too "
                              f"small; use at least {MIN_RESOLUTION} (0: the model's own)")
    if not config.tasks:
        raise ValueError("config.tasks is empty; give at least one task")
    if not kdata.parse_validation(config.validation) and not config.evaluate_test:
        raise ConfigError("config.evaluate_test=False needs a validation split to evaluate on; "
                          "set config.validation (e.g. 0.1)")
    if config.get("keep_best") and not (kdata.parse_validation(config.validation)
                                        and config.eval_every):
        raise ConfigError("config.keep_best chooses each task's patch on validation: set "
                          "config.validation (e.g. 0.1, or 'split') and config.eval_every (the "
                          "steps between the evaluations it chooses from)")
    if config.get("keep_best") and config.train_shared:
        raise ConfigError("config.keep_best keeps each task's patch from its own best step, "
                          "but with config.train_shared the tasks share one trained backbone; "
                          "set one of them to False")
    patch = list(config.patch_rules) if config.patch_rules else config.patch
    return task_chunk(config.task_chunk), PatchSpec.parse(patch, head=config.head or None)


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """``config.mesh`` on this host's devices; the batch sizes must split over its data axis."""
    mesh = make_mesh(config.mesh.tasks, config.mesh.data or None)
    shards = mesh.shape["data"]
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % shards:
            raise ValueError(
                f"config.{key}={config[key]} does not split over the mesh's {shards}-way 'data' "
                f"axis; use a multiple of {shards} or set --config.mesh.data to a divisor"
            )
    return mesh


def _load_task(
    t: ml_collections.ConfigDict, config: ml_collections.ConfigDict, default_resolution: int,
    train: bool, class_names: Sequence[str] | None,
) -> TaskData:
    data_dir = config.data_dir or None
    pinned = None if class_names is None else tuple(class_names)
    train_ds, val_ds, skipped = None, None, {}
    skip = bool(config.skip_bad_images)
    if train:
        # Undecoded: shuffling and resuming (skip) then work on paths/bytes, not pixels.
        train_ds, train_info = kdata.load_source(
            t.dataset, "train", data_dir=data_dir, seed=config.seed, decode=False,
            class_names=pinned, skip_bad_images=skip)
        skipped.update(train_info.skipped)
        fraction = kdata.parse_validation(config.validation)
        if fraction == kdata.VALIDATION_SPLIT:  # The source's own (a folder's val/).
            val_ds, _ = kdata.load_source(
                t.dataset, "validation", data_dir=data_dir, class_names=train_info.class_names,
                skip_bad_images=skip)
            n_train, n_val = train_info.num_examples["train"], int(val_ds.cardinality())
        elif fraction:
            train_ds, val_ds, n_train, n_val = kdata.hold_out(train_ds, fraction, config.seed,
                                                            train_info.class_names)
    if train and not config.evaluate_test:  # The test split stays closed (kfor1 sweep).
        test_ds, info = None, train_info
    else:
        test_ds, info = kdata.load_source(t.dataset, "test", data_dir=data_dir,
                                          class_names=pinned, skip_bad_images=skip)
    skipped.update(info.skipped)
    for split, files in skipped.items():
        print(f"warning: task {t.name!r}: skipped {len(files)} {split} image"
              f"{'s' if len(files) > 1 else ''} that cannot be decoded "
              f"(config.skip_bad_images): {', '.join(files[:5])}"
              + (f" and {len(files) - 5} more" if len(files) > 5 else ""), file=sys.stderr)
    sizes = dict(info.num_examples)
    if val_ds is not None:
        sizes.update(train=n_train, validation=n_val)
    info = dataclasses.replace(info, skipped=skipped, num_examples=sizes)
    if info.num_classes < 2:
        raise ConfigError(
            f"task {t.name!r} ({t.dataset}) has {info.num_classes} class"
            f"{'' if info.num_classes == 1 else 'es'} ({', '.join(info.class_names)}): a "
            "classifier needs at least 2; check the data source (for folder:, one "
            "subdirectory per class)"
        )
    resolution = int(t.resolution) or default_resolution
    return TaskData(Task(t.name, info.num_classes, resolution), info, test_ds, train_ds, val_ds)


def setup(
    config: ml_collections.ConfigDict,
    *,
    train: bool = True,
    class_names: Sequence[Sequence[str]] | None = None,
) -> Setup:
    """Checks ``config``, loads the base and each task's data, parses the patch spec once and
    builds the optimiser.

    Args:
      config: a config from ``kfor1.trainer.config`` (``configs/*.py``).
      train: False for an eval-only setup: the train splits are not opened.
      class_names: per task (in ``config.tasks`` order), the classes of a trained run; each
        source must still have exactly those (an eval-only setup of a folder source needs them,
        since it lists only the test split).

    Returns:
      The ``Setup``.
    """
    chunk, spec = check_values(config)
    if class_names is not None and len(class_names) != len(config.tasks):
        raise ValueError(f"{len(class_names)} class lists for {len(config.tasks)} tasks")
    mesh = build_mesh(config)
    base = load_base(config)
    labels = partition(base.variables, spec, groups=True)
    optimizer, schedules = build_optimizer(config, labels)
    tasks = tuple(
        _load_task(t, config, base.preprocessing.resolution, train,
                   None if class_names is None else class_names[i])
        for i, t in enumerate(config.tasks)
    )
    if train and config.cache_images:
        check_cache_fits(tasks)
    return Setup(config, base, spec, labels, optimizer, schedules, tasks, mesh, chunk)


def check_cache_fits(tasks: Sequence[TaskData], available: int | None = None) -> None:
    """Refuses ``config.cache_images`` when the decoded training splits, estimated from a few
    images each (``kfor1.data.cache.estimate_bytes``), need over half of ``available`` memory
    (default: what this machine has available now)."""
    from kfor1.data.cache import available_memory, estimate_bytes

    available = available_memory() if available is None else available
    sizes = {t.task.name: estimate_bytes(t.train, t.task.resolution,
                                         t.info.num_examples.get("train"))
             for t in tasks}
    total = sum(sizes.values())
    if available and total > available / 2:
        largest = max(sizes, key=sizes.get)
        raise ConfigError(
            f"config.cache_images: the decoded training images would take about "
            f"{total / 1e9:.1f} GB (task {largest!r}: {sizes[largest] / 1e9:.1f} GB), and "
            f"{available / 1e9:.1f} GB of memory is available; set config.cache_images=False "
            "or train at a lower resolution")
