"""Writing a run's files so that none is ever left half-written.

Every file kfor1 writes into a workdir or a patch directory goes through ``atomic_write``:
readers (a resumed run, ``kfor1 eval`` while training goes on, a server reloading a patch) see
the old file or the new one, never a part. A full disk is one ``DiskFullError`` line that says
how much was needed and what to do, found before a checkpoint is started where possible.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

from kfor1.errors import UserError

__all__ = ["DiskFullError", "atomic_write", "check_free_space", "is_disk_full"]

# Errors of a full disk or an exhausted quota, as OSError errnos and as TensorStore's text.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


class DiskFullError(UserError, OSError):
    """The disk (or quota) holding a run's files is full."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or orbax's wrapping of TensorStore's) is a full disk."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _FULL_TEXT)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def check_free_space(directory: str, needed: int, what: str, fix: str) -> None:
    """Raises ``DiskFullError`` unless ``directory``'s disk has ``needed`` bytes (and 10% and
    1 MB more) free: a checkpoint refused before its first byte leaves nothing half-written
    and no wall of tracebacks from the writer's threads."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if free < needed * 1.1 + 2**20:
        raise DiskFullError(f"disk full: {what} needs about {_mb(needed)} in "
                            f"{directory}, {_mb(free)} free; {fix}")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``path`` through a temporary file in its directory and ``os.replace``: readers see
    the old file or the new one, never a part (kfor1's one way to write a run's files)."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
