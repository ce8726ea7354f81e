"""CPU runtime tuning for processes that kfor1 starts (the CLI, launchers, demo, benchmarks).

XLA:CPU allocates its large activation buffers afresh on every step. glibc's malloc serves
blocks over its mmap threshold with fresh ``mmap`` pages and returns freed memory to the OS, so
every step page-faults its working set again, and an elementwise op over a large tensor takes
several times as long (``benchmarks/README.md`` has the numbers). Keeping freed memory in the
process removes that cost. It changes the process-wide allocator, so the library never
does it on import; entry points call ``keep_freed_memory()``.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt's "-1 disables trimming completely". The largest int (2 GiB) is not enough: a K=8
# EfficientNet-Lite0 step frees a ~4.5 GB temporary buffer, which glibc then trimmed and
# faulted back in on every step.
_NEVER = -1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once; None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse (no mmap'd blocks, no trimming, one arena).

    Returns whether the settings took effect (False off glibc, e.g. on macOS or musl).
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        return all(
            libc.mallopt(option, value) == 1
            for option, value in (
                (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER), (_M_ARENA_MAX, 1),
            )
        )
    except AttributeError:
        return False


def release_freed_memory() -> bool:
    """Returns the memory that glibc holds free to the OS now (``malloc_trim(0)``), once.

    With ``keep_freed_memory()`` a process keeps every page it ever freed, which is what a
    training loop wants (its next step reuses them) but not a process that switches between
    workloads whose large buffers interleave: the heap fragments and its footprint grows to the
    sum of their peaks instead of the largest (the benchmark suite, alternating kfor1's and
    PyTorch's full fine-tuning steps at 224 px, batch 128, went past 24 GB). Call it between
    such workloads; the next step faults its pages in again. Returns whether it ran.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
        return True
    except AttributeError:
        return False
