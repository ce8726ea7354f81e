"""Training checkpoints through orbax's ``CheckpointManager``.

Checkpoints are written atomically (a temporary directory renamed when complete), so a crash
while saving never corrupts the latest good checkpoint; only ``keep`` are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from kfor1.multitask import MultiTaskState


def _as_tree(state: MultiTaskState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


class Checkpointer:
    """Saves and restores ``MultiTaskState``s under ``directory``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: MultiTaskState, force: bool = False) -> None:
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)

    def restore(self, template: MultiTaskState, step: int | None = None) -> MultiTaskState:
        """Restores into the structure, dtypes and shardings of ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        steps = sorted(self._manager.all_steps())
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {self.directory}; it keeps steps "
                f"{', '.join(map(str, steps))} (older ones are pruned: config.keep_checkpoints)"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))
        try:
            tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:
            raise ValueError(
                f"the checkpoint at step {step} in {self.directory} does not fit this run's "
                "model, patch, tasks or optimizer (the config changed?); train in a new "
                f"--workdir or restore the original config ({str(e).splitlines()[0]})"
            ) from None
        return template.replace(**tree)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
