"""Writing a run's files so that none is ever left half-written.

Every file kfor1 writes into a workdir or a patch directory goes through ``atomic_write``:
readers (a resumed run, ``kfor1 eval`` while training goes on, a server reloading a patch) see
the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


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
