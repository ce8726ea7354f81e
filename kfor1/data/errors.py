"""The one error type for data problems, so callers can report them without a traceback."""

from __future__ import annotations

from kfor1.errors import UserError

__all__ = ["DataError"]


class DataError(UserError, ValueError):
    """A data source is missing, malformed or unreadable; the message names the fix."""
