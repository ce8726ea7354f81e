"""``kfor1 train --dry-run``: a config checked on a laptop before it runs on an accelerator host.

It does what ``kfor1.trainer.experiment.setup`` does up to the first expensive step, from shapes
alone: checks the config's values, builds the model (no weights are read: ``jax.eval_shape``), the
partition and the optimiser, and says where the weights would come from and, per task, whether
its data is there (listed, not decoded). What only the target host can have — its devices, its
prepared datasets — is reported, not fatal: the report ends with the problems found.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from kfor1 import data as kdata
from kfor1.models import create, get_entry, packaged_weights_path
from kfor1.patch.optim import build_optimizer
from kfor1.patch.report import report
from kfor1.patch.spec import partition
from kfor1.table import format_table
from kfor1.trainer.experiment import build_mesh, check_values, model_kwargs


def _weights(config: ml_collections.ConfigDict) -> str:
    if config.weights:
        if not os.path.exists(config.weights):
            raise FileNotFoundError(f"no such weights file: {config.weights}")
        return config.weights
    entry = get_entry(config.model)
    if entry.user:
        return f"{entry.name}'s load_fn" if entry.load else "its own initialisation (seed 0)"
    return f"{packaged_weights_path(config.model)} (packaged)"


def _data(t: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> str:
    _, info = kdata.load_source(t.dataset, "test", data_dir=config.data_dir or None,
                                check_images=False, decode=False)
    sizes = ", ".join(f"{n:,} {split}" for split, n in info.num_examples.items() if n >= 0)
    return f"{info.num_classes} classes; {sizes or 'sizes unknown'}"


def dry_run(config: ml_collections.ConfigDict) -> tuple[str, list[str]]:
    """The report of what ``train(config, ...)`` would build and read, and the problems found.

    Config mistakes (an unknown preset, a rule that matches nothing, a missing learning rate)
    raise, as they would in training; missing weights, data or devices are problems returned
    with the report, each with the fix its error message names.
    """
    _, spec = check_values(config)
    entry = get_entry(config.model)
    module = create(config.model, num_classes=None, **model_kwargs(config))
    size = entry.preprocessing.resolution
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    labels = partition(variables, spec, groups=True)
    _, schedules = build_optimizer(config, labels)
    problems: list[str] = []

    def attempt(what, fn):
        try:
            return fn()
        except (ValueError, OSError, ModuleNotFoundError) as e:
            message = " ".join(str(e).split())
            problems.append(f"{what}: {message}")
            return "not available here (see the problems below)"

    lines = [
        f"model: {config.model} ({entry.description}), {size} px",
        f"weights: {attempt('weights', lambda: _weights(config))}",
        f"patch: {spec.describe()}; train_shared={config.train_shared}",
        f"optimiser: {config.optimizer}, {config.schedule} schedule, {config.num_steps:,} steps "
        f"of {config.batch_size} images per task; peak learning rates "
        + ", ".join(f"{g}={float(config.learning_rate[g]):g}" for g in sorted(schedules)),
        "",
        f"parameters, with the base's {module.num_classes}-class head (each task's own head "
        "replaces it):",
        str(report(variables, labels, spec)),
        "",
    ]
    mesh = attempt("mesh", lambda: build_mesh(config))
    lines.append(f"mesh: {dict(mesh.shape) if not isinstance(mesh, str) else mesh} "
                 f"({jax.device_count()} {jax.default_backend()} device(s) here)")
    rows = [(t.name, t.dataset, attempt(f"data of task {t.name!r}", lambda t=t: _data(t, config)))
            for t in config.tasks]
    lines += ["", format_table(("task", "data source", "what is there"), rows, left=3)]
    return "\n".join(lines), problems
