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
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt's "-1 disables trimming completely". The largest int (2 GiB) is not enough: a K=8
# EfficientNet-Lite0 step frees a ~4.5 GB temporary buffer, which glibc then trimmed and
# faulted back in on every step.
_NEVER = -1


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse (no mmap'd blocks, no trimming, one arena).

    Returns whether the settings took effect (False off glibc, e.g. on macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(
            libc.mallopt(option, value) == 1
            for option, value in (
                (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER), (_M_ARENA_MAX, 1),
            )
        )
    except (OSError, AttributeError):
        return False
