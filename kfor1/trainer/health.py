"""A run's health, checked every step: training stops at the first non-finite loss or
parameter, or a loss far above its first value, before a diverged state is checkpointed; and
its stop signals: SIGINT (Ctrl-C) and SIGTERM (preemption) end the run after the step in
flight, with a checkpoint of it.

Why in the loop and not at log steps only: a learning rate of 1e6 gives losses of 1e9-1e32
that are never NaN, and an inf that reaches the optimizer state poisons every later
checkpoint. The check costs one small reduction per step, read while the next step runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfor1.errors import TrainingError
from kfor1.trainer.checkpoint import Checkpointer
from kfor1.trainer.experiment import Setup

# A loss this many times its first value (or above DIVERGED_LOSS) is divergence, not noise.
DIVERGENCE_FACTOR = 100.0
DIVERGED_LOSS = 1e4


@jax.jit
def _health(loss: jax.Array, params: Any, limit: jax.Array) -> jax.Array:
    """One flag per task: its loss is finite and below ``limit``; and one for the parameters
    (finite after the update: an inf in the optimizer state shows here first)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    return jnp.concatenate([jnp.isfinite(loss) & (loss < limit), finite[None]])


class Guard:
    """Stops training at the first unhealthy step (non-finite loss or parameters, or a loss
    ``DIVERGENCE_FACTOR`` times its first value), so that no checkpoint holds a diverged state
    and the message names the learning rate to lower."""

    def __init__(self, s: Setup, ckpt: Checkpointer):
        self.s, self.ckpt = s, ckpt
        self.limit: jax.Array | None = None
        self.pending: tuple[int, jax.Array, jax.Array] | None = None

    def push(self, step: int, metrics: Mapping[str, jax.Array], state: Any) -> None:
        loss = jnp.asarray(metrics["loss"], jnp.float32)
        if self.limit is None:  # The first step's losses set the bar (loss > 0 always).
            first = np.asarray(jax.device_get(loss))
            self.limit = jnp.asarray(np.where(np.isfinite(first), np.minimum(
                DIVERGENCE_FACTOR * np.maximum(first, 1.0), DIVERGED_LOSS), DIVERGED_LOSS))
        self.pending = (step, loss, _health(loss, state.params, self.limit))

    def check(self) -> None:
        """Raises ``TrainingError`` if the last pushed step was unhealthy (waits for it)."""
        if self.pending is not None:
            self._check(*self.pending)
            self.pending = None

    def _check(self, step: int, loss: jax.Array, flags: jax.Array) -> None:
        flags = np.asarray(jax.device_get(flags))
        if flags.all():
            return
        losses = np.asarray(jax.device_get(loss))
        names = [t.task.name for t in self.s.tasks]
        bad = [n for n, ok in zip(names, flags[:-1]) if not ok] or names
        what = ("became NaN/inf" if not np.all(np.isfinite(losses)) or not flags[-1]
                else "diverged (over 100x its first value)")
        rates = {g: float(self.s.config.learning_rate[g]) for g in self.s.schedules}
        group = max(rates, key=rates.get)
        last = self.ckpt.latest_step()
        listed = ", ".join(f"{g}={r:g}" for g, r in rates.items())
        raise TrainingError(
            f"the training loss {what} at step {step} for task(s) {bad} (loss "
            f"{', '.join(f'{x:.3g}' for x in losses)}); lower config.learning_rate.{group} "
            f"(now {rates[group]:g}; this run's: {listed}) or raise warmup_steps. "
            + (f"Checkpoints hold only healthy states: the run resumes from step {last}."
               if last is not None else "No checkpoint was written.")
        )


class Interrupted(TrainingError):
    """The run was asked to stop (SIGINT or SIGTERM) and saved a checkpoint first."""


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, str | None]]:
    """While active, SIGINT and SIGTERM only record their name in the yielded dict (the loop
    stops after the step in flight: a step interrupted half-way has donated its input state,
    and there would be nothing whole to save). A second SIGINT interrupts at once."""
    received: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield received  # Signal handlers can only be set from the main thread.
        return

    def handler(signum: int, frame: Any) -> None:
        if received["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
