"""The one error type for data problems, so callers can report them without a traceback."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data source is missing, malformed or unreadable; the message names the fix."""
