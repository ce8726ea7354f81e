"""JAX's persistent compilation cache for processes that kfor1 starts (the CLI, launchers).

Compiling a training step is most of a short run's start-up on a CPU (seconds to tens of
seconds; ``benchmarks/README.md``), and a user compiles the same step again and again: a run
resumed after a preemption, the same command with another ``--workdir``, the evaluation and
prediction commands, a sweep's runs with the same patch. JAX can keep compiled executables on
disk, keyed by the program, its compiler options and the machine, so each is compiled once.
Like ``kfor1.cpu.keep_freed_memory``, this changes process-wide state, so the library never
does it on import; entry points call ``enable_compilation_cache()``.
"""

from __future__ import annotations

import hashlib
import os
import platform

ENV = "KFOR1_COMPILATION_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"


def machine_tag() -> str:
    """The processor's architecture and a hash of its model and instruction-set flags.

    XLA:CPU compiles for the host's instruction set, and a home directory can be shared by
    machines with different processors (a cluster's NFS home): XLA refuses an executable built
    for features its host lacks, logging an error each time, so each kind of processor gets a
    directory of its own.
    """
    described = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.split(":")[0].strip() in (
                "model name", "flags", "Features", "CPU part")]
        described += "".join(sorted(set(lines)))
    except OSError:
        described += platform.processor()
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/kfor1/jax/<machine_tag()>``, by default under ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kfor1", "jax", machine_tag())


def enable_compilation_cache() -> str | None:
    """Turns JAX's persistent compilation cache on; returns its directory (None: off).

    ``JAX_COMPILATION_CACHE_DIR``, when set, is JAX's own setting and wins. Otherwise
    ``KFOR1_COMPILATION_CACHE`` names the directory, or turns the cache off with ``0``; unset,
    the directory is ``default_cache_dir()``. A directory that cannot be created (a read-only
    home, say) leaves the cache off: it only saves time.
    """
    import jax

    if os.environ.get(JAX_ENV):
        return os.environ[JAX_ENV]
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    path = os.path.abspath(os.path.expanduser(setting or default_cache_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path
