"""The allocator tuning that CPU entry points apply."""

import sys

from kfor1.cpu import keep_freed_memory


def test_keep_freed_memory_takes_effect_on_linux_glibc():
    assert keep_freed_memory() is sys.platform.startswith("linux")
