"""Quiets what orbax and TensorStore print when a save fails in the background.

A failed asynchronous save prints, besides the error kfor1 reports: orbax's logged tracebacks
(absl, once per thread: the same exception, raised again from ``wait_until_finished``);
TensorStore's completion callbacks landing on the save's closed event loop ("Event loop is
closed", through ``sys.unraisablehook``, once per array); asyncio's "exception was never
retrieved" for the abandoned writes; and "coroutine … was never awaited" at exit. Deleting a
run's ``checkpoints/`` while it saves printed about 860 such lines. ``OrbaxNoise`` drops exactly
those, and only around the ``Checkpointer`` that owns them; anything else passes through.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any


class OrbaxNoise(logging.Filter):
    """Installed by ``Checkpointer`` for its lifetime (``install`` / ``remove``).

    Args:
      directory: the checkpoint directory; asyncio's records are dropped only if they name it.
      failing: whether a save in that directory is known to have failed (the directory was
        deleted): only then are the event-loop and never-retrieved messages dropped.
    """

    def __init__(self, directory: str, failing: Callable[[], bool]):
        super().__init__()
        self._directory = directory
        self._failing = failing
        self._previous_hook: Any = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":  # "Future/Task exception was never retrieved".
            return not (self._directory in record.getMessage() and self._failing())
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (from_orbax and record.exc_info)  # Raised again to the caller.

    def _unraisable(self, info: Any) -> None:
        closed_loop = (isinstance(info.exc_value, RuntimeError)
                       and str(info.exc_value) == "Event loop is closed")
        if not (closed_loop and self._failing()):
            self._previous_hook(info)

    def install(self) -> None:
        logging.getLogger("absl").addFilter(self)
        logging.getLogger("asyncio").addFilter(self)
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def failed(self) -> None:
        """A save was abandoned: its coroutines are never awaited (warned about at exit)."""
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)

    def remove(self, keep_unraisable: bool = False) -> None:
        """Uninstalls the filters; ``keep_unraisable`` leaves the closed-event-loop filter in
        place (a failed save's callbacks can still arrive after its checkpointer closed)."""
        logging.getLogger("absl").removeFilter(self)
        logging.getLogger("asyncio").removeFilter(self)
        if sys.unraisablehook == self._unraisable and not keep_unraisable:
            sys.unraisablehook = self._previous_hook
