"""Reading files that may be hostile: bounded, regular, inside their folder, parsed as data only.

Patches and bases are shared and downloaded, and a run directory may come from anyone: every
file kfor1 reads from one is read through here, so that a ``patch.msgpack`` linked to
``/dev/zero``, a ``patch.json`` nested 100,000 levels deep or a ``config.json`` that links to
``/etc/passwd`` is refused in one line that names the file, before any work. What a file *says*
is checked by its own schema (``kfor1.files.patchcheck``, ``kfor1.trainer.workdir``); nothing
read here is ever imported or executed (model names in such files are checked against the
registry, ``kfor1.models.registry.check_named_by_file``).

Every function raises ``error`` (a ``UserError`` subclass of the caller's domain, such as
``PatchFileError``), so that the message reads as the rest of its command's.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from kfor1.errors import UserError

MAX_JSON_BYTES = 16 * 2**20
"""A metadata file's limit: 16 MiB holds 100,000 class names of 160 characters."""
MAX_JSON_DEPTH = 32
"""How deeply a metadata file may nest; kfor1 writes at most 4 levels."""
MAX_WEIGHTS_BYTES = 8 * 2**30
"""A weights file's limit (8 GiB: a ViT-H in float32 is 2.5 GiB); a patch's is its own."""


class UntrustedFileError(UserError, ValueError):
    """A file refused before it was parsed: missing, not a regular file, outside its folder,
    too large, or too deeply nested."""


MAX_NAME_CHARS = 128


def check_name(name: Any, what: str, error: type[Exception] = UntrustedFileError) -> str:
    """A name that becomes a file or folder name (a task's ``patches/<task>/``, an export's
    entry): 1 to 128 printable characters, no path separator, not ``.`` or ``..``, not
    starting with ``-``. Returns it.

    Why: a task named ``..`` (from ``folder:data/x/..``) or ``../../x`` would write its patch
    outside the run directory, and one with a newline or an ANSI escape would rewrite what a
    terminal shows.

    Example:
      >>> check_name("flowers", "task name")
      'flowers'
    """
    if not isinstance(name, str) or not name:
        raise error(f"{what} {name!r} is not a name; give 1 to {MAX_NAME_CHARS} characters")
    shown = name.encode("unicode_escape").decode("ascii")[:80]
    problem = (
        "a path separator" if "/" in name or "\\" in name or (os.altsep or "/") in name
        else "no name of its own ('.' and '..' are folders)" if name in (".", "..")
        else "a character that is not printable" if not name.isprintable()
        else "a leading '-' (it would read as an option)" if name.startswith("-")
        else f"more than {MAX_NAME_CHARS} characters" if len(name) > MAX_NAME_CHARS
        else None)
    if problem:
        raise error(f"{what} '{shown}' has {problem}; it becomes a file name: use letters, "
                    "digits, '_', '-' and '.'")
    return name


def regular_file(path: str | os.PathLike, what: str, *, max_bytes: int,
                 inside: str | os.PathLike | None = None,
                 error: type[Exception] = UntrustedFileError) -> int:
    """Checks that ``path`` is a regular file of at most ``max_bytes`` and, with ``inside``,
    that it resolves (symlinks followed) to a place inside that folder; returns its size.

    A device (``/dev/zero``), a FIFO or a folder would be read forever or fail half-way; a
    symlink out of a downloaded folder would make kfor1 read, and a hash vouch for, a file the
    sender never had.
    """
    path = os.fspath(path)
    if inside is not None:
        root = os.path.realpath(inside)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise error(f"{what} ({path}) links outside its folder {os.fspath(inside)} (to "
                        f"{real}); kfor1 reads only files inside it — copy the file there")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} is missing: {path}") from None
    except OSError as e:
        raise error(f"{what} cannot be read: {path} ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        raise error(f"{what} ({path}) is {kind}, not a regular file")
    if info.st_size > max_bytes:
        raise error(f"{what} ({path}) is {info.st_size:,} bytes, over the {max_bytes:,} a "
                    "kfor1 file of its kind may have; it is not one kfor1 wrote")
    return info.st_size


def read_bytes(path: str | os.PathLike, what: str, *, max_bytes: int,
               inside: str | os.PathLike | None = None,
               error: type[Exception] = UntrustedFileError) -> bytes:
    """The bytes of a file ``regular_file`` accepts, never more than ``max_bytes`` (a file that
    grows while it is read is refused too)."""
    regular_file(path, what, max_bytes=max_bytes, inside=inside, error=error)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what} cannot be read: {os.fspath(path)} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{what} ({os.fspath(path)}) grew past {max_bytes:,} bytes while read")
    return data


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def parse_json(text: str | bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH,
               error: type[Exception] = UntrustedFileError) -> Any:
    """JSON as plain data, refused in one line when malformed or nested over ``max_depth``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{what} nests deeper than Python can parse; it is not a file kfor1 "
                    "wrote") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what} is not valid JSON ({e})") from None
    if depth(value) > max_depth:
        raise error(f"{what} nests {depth(value)} levels deep, over the {max_depth} a kfor1 "
                    "file may have; it is not a file kfor1 wrote")
    return value


def read_json(path: str | os.PathLike, what: str, *, inside: str | os.PathLike | None = None,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              error: type[Exception] = UntrustedFileError) -> Any:
    """A JSON file read through ``read_bytes`` and ``parse_json``.

    Args:
      path: the file.
      what: how messages name it (``"patch runs/a/patches/x: patch.json"``).
      inside: the folder it must stay in (symlinks resolved); None: anywhere.
      max_bytes, max_depth: its limits.
      error: the exception class raised.

    Returns:
      The parsed value (dicts, lists, strings, numbers, booleans, None).

    Example:
      >>> meta = read_json("runs/a/patches/x/patch.json", "patch.json", inside="runs/a/patches/x")
    """
    data = read_bytes(path, what, max_bytes=max_bytes, inside=inside, error=error)
    return parse_json(data, what, max_depth=max_depth, error=error)
