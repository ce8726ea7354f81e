"""The training step's memory, from the compiled step, checked before the first step runs.

Why: ``resolution=4096`` compiled for 95 s and then failed to allocate 72.8 GB with a raw
traceback; on a machine without a limit it would have exhausted memory first, taking the
desktop with it. XLA knows what the step needs once it is compiled
(``Compiled.memory_analysis()``: its arguments, outputs and temporaries, per device), so the
trainer compiles the step ahead of time (``jit(...).lower(...).compile()``: the same single
compilation the first step would do) and refuses with the number and the fix when it cannot fit.
"""

from __future__ import annotations

from typing import Any

import jax

from kfor1.data.cache import available_memory
from kfor1.trainer.config import ConfigError

__all__ = ["available_bytes", "check_step_memory", "step_bytes"]


def step_bytes(compiled: Any) -> int | None:
    """Peak bytes one device holds while running ``compiled``: arguments + outputs − the
    outputs that reuse donated arguments + temporaries. None where the backend does not say."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def available_bytes(device: jax.Device | None = None) -> tuple[int, str]:
    """Bytes a step on ``device`` can use, and where that number comes from. An accelerator's
    allocator limit less what is in use; on the CPU, the host's available memory (shared by
    every simulated CPU device). 0 where unknown."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)),
                    f"{device.device_kind} memory")
    return available_memory(), "available host memory"


def check_step_memory(compiled: Any, what: str, fix: str,
                      available: tuple[int, str] | None = None) -> int | None:
    """Refuses a compiled step that cannot fit in memory, before it runs.

    Args:
      compiled: ``jax.jit(step).lower(...).compile()``.
      what: the step, for the message ("the training step (2 tasks x 32 images at 4096 px)").
      fix: the config fields that lower it.
      available: (bytes, source), default ``available_bytes()``.

    Returns:
      The step's estimated bytes on this process (None if the backend does not say).

    Raises:
      ConfigError: the estimate exceeds what is available.
    """
    per_device = step_bytes(compiled)
    if per_device is None:
        return None
    devices = jax.local_devices()
    # Simulated CPU devices share the host's memory: each holds its own part of the step.
    need = per_device * (len(devices) if devices[0].platform == "cpu" else 1)
    have, source = available if available is not None else available_bytes(devices[0])
    if have and need > have:
        raise ConfigError(f"{what} needs about {_size(need)} and {source} is {_size(have)}; "
                          f"{fix}")
    return need


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
