"""The errors a user can cause, in one place, so that every entry point reports them alike.

A *user error* is input kfor1 cannot use — a mistyped preset, a missing folder, a corrupt file, a
learning rate that diverges — and its message names what was wrong and what to do. The command
line (``kfor1 ...``, ``python -m launch.*``) prints such an error as one ``error: ...`` line
and exits with status 2; anything else is a bug and keeps its traceback.

kfor1's own error types derive from ``UserError`` (and from the built-in type a caller would
expect, ``ValueError`` for bad values); ``USER_ERRORS`` adds the built-in errors that name a bad
path or a missing optional package.
"""

from __future__ import annotations

import logging

__all__ = ["USER_ERRORS", "TrainingError", "UserError", "one_line", "quiet_library_logs"]


class UserError(Exception):
    """Input that kfor1 cannot use; the message says what to change.

    The base of kfor1's own error types; the command line prints one as an ``error: ...`` line.

    Args:
      *args: the message: what was wrong and what to do.

    Example:
      >>> try:
      ...     kfor1.load_patch("runs/a/patches/flowers")
      ... except kfor1.UserError as e:  # a corrupt or edited patch, for example
      ...     print(f"error: {e}")
    """


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN); says what to change.

    A ``UserError`` and a ``RuntimeError``.

    Args:
      *args: the message: what happened and what to change (a smaller learning rate, ...).

    Example:
      >>> raise kfor1.TrainingError("the loss is NaN at step 120; lower the learning rate")
    """


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,  # Also unknown models, bad config values and ml_collections' type errors.
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ModuleNotFoundError,  # An optional package (e.g. torch for a benchmark) is not installed.
)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (or its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_library_logs() -> None:
    """Keeps absl log records below ERROR off an entry point's stderr: orbax reports timings
    at WARNING ("Waiting for previous save to complete took ..."), and a command's stderr is for
    what the user must act on. A filter, not a level: parsing absl flags resets the level."""
    absl = logging.getLogger("absl")
    if _errors_only not in absl.filters:
        absl.addFilter(_errors_only)
