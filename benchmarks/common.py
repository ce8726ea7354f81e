"""What every benchmark script repeats: the machine it ran on, its ``--json`` file, the timer of
a compiled step, and the compile options of a ``--tiny`` run.

The scripts run as modules from the repository root (``python -m benchmarks.suite``), so
``benchmarks`` and ``kfor1`` import from the checkout without touching ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (scripts write ``docs/`` and ``runs/`` under it)."""
SHARED_DATA = ROOT.parent / "shared" / "data"
"""The real image data beside a checkout (``cifar10/``, ``clothing10/``): here and in CI only."""

# Before TensorFlow is imported (kfor1.data, export): its C++ logs stay off the tables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> dict[str, Any]:
    """The machine a result was measured on: device, cores, processor and versions."""
    import jax

    device = jax.devices()[0]
    return {"device": str(device), "platform": device.platform, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "jax_version": jax.__version__, "python": platform.python_version()}


def machine_line() -> str:
    """``machine()`` as the one line each script prints before its tables."""
    m = machine()
    return (f"device: {m['device']} ({m['platform']}) x{m['device_count']}, {m['cpu_count']} CPU "
            f"cores ({m['processor']}), jax {m['jax_version']}, python {m['python']}")


def cell_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments that name one cell of a benchmark: ``--model``,
    ``--resolution``, ``--batch`` (Lite0, 128 px, 32 images) and ``--json``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def tiny_compiler_options(tiny: bool) -> dict[str, Any] | None:
    """XLA options of a ``--tiny`` run, which only checks that the code runs: no LLVM
    optimisation, which is most of the compile time. None (XLA's defaults) otherwise."""
    return {"xla_backend_optimization_level": 0} if tiny else None


def _default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: str | os.PathLike | None, value: Any) -> None:
    """Writes ``value`` to ``path`` (indented, numpy scalars as numbers, a final newline); None
    writes nothing, so ``write_json(args.json, results)`` serves an optional ``--json``."""
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=_default)
        f.write("\n")


def warm_up(run: Callable[[], Any], update: Callable[[Any], None], warmup: int) -> float:
    """Runs ``warmup`` untimed steps; returns the seconds of the first (compiling) call."""
    import jax

    start = time.perf_counter()
    update(jax.block_until_ready(run()))
    first_call_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        update(jax.block_until_ready(run()))
    return first_call_s


def time_steps(run: Callable[[], Any], update: Callable[[Any], None], steps: int) -> float:
    """Mean seconds per step over ``steps`` back-to-back steps (dispatch overlaps compute)."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        result = run()
        update(result)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / steps
