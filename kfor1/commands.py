"""The work behind ``kfor1 eval``, ``kfor1 export`` and ``kfor1 params``.

``train`` saves its config to ``<workdir>/config.json``, so these commands need only the
workdir: they rebuild the run's setup, restore a checkpoint and act on it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} holds no {CONFIG_FILE}; is it the --workdir of a `kfor1 train` run?"
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    # ConfigDict converts nested dicts but not dicts inside lists.
    data["tasks"] = [ml_collections.ConfigDict(t) for t in data.get("tasks", [])]
    return ml_collections.ConfigDict(data)


def restore(workdir: str, step: int | None = None) -> tuple[Any, Any]:
    """The run's setup and its state at ``step`` (default: the latest checkpoint)."""
    from kfor1 import train as trainer
    from kfor1.checkpoint import Checkpointer

    config = load_config(workdir)
    config.progress = False
    s = trainer.setup(config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first")
    state = checkpointer.restore(trainer.init_state(s), step)
    checkpointer.close()
    return s, state


def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, dict[str, float]]:
    from kfor1 import train as trainer

    s, state = restore(workdir, step)
    return trainer.evaluate(s, state)


def export_workdir(workdir: str, out: str | None = None, step: int | None = None) -> dict:
    from kfor1 import train as trainer

    s, state = restore(workdir, step)
    return trainer.export_patches(s, state, out or workdir)


def params_report(model: str, spec: str, num_classes: int = 1000, head: str | None = None,
                  overview: bool = False) -> str:
    """The patch report of ``spec`` on ``model`` (and clu's per-parameter table)."""
    import jax
    import jax.numpy as jnp

    from kfor1.models import create
    from kfor1.report import report
    from kfor1.spec import partition

    module = create(model, num_classes=num_classes)
    variables = jax.eval_shape(
        lambda x: module.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 64, 64, 3),
                                                                          jnp.float32)
    )
    labels = partition(variables, spec, groups=True, head=head)
    text = str(report(variables, labels))
    if overview:
        from clu import parameter_overview

        table = parameter_overview.get_parameter_overview(variables["params"], include_stats=False)
        text = table + "\n\n" + text
    return text
