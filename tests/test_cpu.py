"""The allocator tuning that CPU entry points apply."""

import subprocess
import sys
from pathlib import Path

import pytest

from kfor1.cpu import keep_freed_memory


def test_keep_freed_memory_takes_effect_on_linux_glibc():
    assert keep_freed_memory() is sys.platform.startswith("linux")


_REUSE = """
import os, sys
import numpy as np
from kfor1.cpu import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
np.ones(2_400_000_000 // 8)  # Over 2 GiB (more than any int trim threshold), filled, freed.
with open("/proc/self/statm") as f:
    print(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))  # Resident bytes after free.
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_a_freed_buffer_over_2_gib_stays_in_the_process():
    """A K=8 training step frees ~4.5 GB of temporaries. If glibc hands them back to the OS,
    the next step page-faults and zeroes all of it again (~1 s of system time per step)."""

    def resident_after_free(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return int(out.stdout.split()[-1])

    assert resident_after_free("default") < 1_000_000_000  # Returned to the OS.
    assert resident_after_free("kept") > 2_400_000_000  # Kept for the next step.
