"""Command-line flags of the commands that take a config: ``--config FILE[:ARGS]`` with absl's
``--config.KEY=VALUE`` overrides (type-checked against the locked config), which argparse
cannot express, and each command's own flags. Shared by ``kfor1 train`` and ``kfor1 sweep``.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

from kfor1.errors import one_line

TRAIN_EXAMPLE = "kfor1 train --config configs/transfer.py:dataset=digits --workdir runs/digits"


def _flag_message(exc: BaseException) -> str:
    """absl's and ml_collections' parse errors as one line: a config file's own error (which
    ml_collections wraps with its traceback) by its last line, an unknown field by its name."""
    text = str(exc)
    if isinstance(exc, AttributeError):  # ml_collections: "'num_stepz'\nDid you mean ...?"
        message: object = exc
        while isinstance(message, BaseException) and message.args:  # A KeyError inside.
            message = message.args[0]
        name, _, hint = str(message).partition("\n")
        return f"unknown config field {name.strip(chr(39))!r}" + (f"; {hint}" if hint else "")
    errno = re.search(r"\[Errno \d+\] (.+)$", text, flags=re.MULTILINE)
    if errno:  # ml_collections lists every path it tried; the reason names the file.
        return f"cannot load the config file: {errno.group(1)}"
    errors = re.findall(r"^[\w.]*(?:Error|Exception): (.+)$", text, flags=re.MULTILINE)
    return one_line(errors[-1] if errors else text)


def _config_path(argv: Sequence[str]) -> str | None:
    """The file of ``--config FILE[:ARGS]`` (or ``--config=FILE[:ARGS]``) in ``argv``."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg[len("--config="):] if arg.startswith("--config=") else None)
        if value:
            return value.split(":", 1)[0]
    return None


def _in_config_file(exc: BaseException, path: str | None) -> str | None:
    """Where in the user's config file ``exc`` (or an error it was raised from) happened, as
    ``config file F line N (in FN): Type: message``; None when it did not happen there. A
    config file is the user's Python: its mistake is named by file and line, not by absl's and
    ml_collections' stack."""
    if not path:
        return None
    target = os.path.realpath(path)
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SyntaxError) and error.filename and os.path.realpath(
                error.filename) == target:
            return (f"config file {path} line {error.lineno}: SyntaxError: "
                    f"{error.msg}")
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if os.path.realpath(f.filename) == target]
        if frames:
            where = "" if frames[-1].name == "<module>" else f" (in {frames[-1].name})"
            return (f"config file {path} line {frames[-1].lineno}{where}: "
                    f"{type(error).__name__}: {one_line(error)}")
        if isinstance(error, TypeError) and "get_config()" in str(error):
            return (f"config file {path}: {_flag_message(error)} (get_config takes the text after "
                    "':' as one argument, or none without it)")
        error = error.__cause__ or error.__context__
    return None


def parse_config_args(
    argv: Sequence[str], command: str, example: str, strings: Sequence[str] = (),
    integers: Sequence[str] = (), booleans: Sequence[str] = (),
    required: str = "--config is required",
) -> tuple[Any, dict[str, Any]]:
    """``(config, values)`` from a command's absl flags: ``--config FILE[:ARGS]``, its
    ``--config.KEY=VALUE`` overrides, and the named string, integer and boolean flags (None or
    False when not given; a dash in a flag is also spelled as an underscore). ``required`` is
    the error when ``--config`` is missing.

    Raises ``kfor1.trainer.config.ConfigError`` for an unknown or unparsable flag, a config file
    that fails to load, or an unknown config field.
    """
    from absl import flags
    from ml_collections import config_flags

    from kfor1.trainer.config import ConfigError

    def spelled(arg: str) -> str:
        name, sep, rest = arg.partition("=")
        return "--" + name[2:].replace("-", "_") + sep + rest if arg.startswith("--") else arg

    args = [f"kfor1 {command}", *(a if a.startswith("--config") else spelled(a) for a in argv)]
    fv = flags.FlagValues()  # Our own: importing kfor1 defines no global flags.
    config = config_flags.DEFINE_config_file(
        "config", None, "config file[:args]", flag_values=fv, lock_config=True, sys_argv=args
    )
    defined = {name: flags.DEFINE_string(name, None, name, flag_values=fv) for name in strings}
    defined |= {name: flags.DEFINE_integer(name, None, name, flag_values=fv)
                for name in integers}
    defined |= {name: flags.DEFINE_boolean(name, False, name, flag_values=fv)
                for name in booleans}
    try:
        rest = fv(args)
        value = config.value
        if value is not None:
            value.keys()  # A file that failed to load raises on first use: make that now.
    except Exception as e:  # noqa: BLE001 - a config file is Python and may raise anything.
        raise ConfigError(_in_config_file(e, _config_path(argv)) or _flag_message(e)) from None
    if rest[1:]:
        raise ConfigError(f"unexpected arguments {rest[1:]}; e.g. {example}")
    if value is None:
        raise ConfigError(f"{required}; e.g. {example}")
    return value, {name: flag.value for name, flag in defined.items()}


def parse_train_args(argv: Sequence[str]) -> tuple[Any, str | None, int | None, bool, bool]:
    """``(config, workdir, stop_at_step, dry_run, help_config)`` from ``kfor1 train``'s
    arguments (absl flags; ``--dry-run`` is also spelled ``--dry_run``, ``--help-config``
    ``--help_config``). ``--help-config`` alone, without ``--config``, gives the defaults of
    ``kfor1.trainer.config.base_config``.

    Raises ``kfor1.trainer.config.ConfigError`` for a missing, unknown or unparsable flag, a config
    file that fails to load, or an unknown config field.
    """
    from kfor1.trainer.config import ConfigError, base_config

    if {"--help-config", "--help_config"} & set(argv) and not any(
            a == "--config" or a.startswith("--config=") for a in argv):
        rest = [a for a in argv if a not in ("--help-config", "--help_config")]
        if rest:
            raise ConfigError(f"--help-config without --config takes no other flag, got {rest}; "
                              "e.g. kfor1 train --config configs/transfer.py --help-config")
        return base_config(), None, None, False, True
    config, v = parse_config_args(argv, "train", TRAIN_EXAMPLE, strings=("workdir",),
                                  integers=("stop_at_step",),
                                  booleans=("dry_run", "help_config"),
                                  required="--config and --workdir are required")
    if not (v["workdir"] or v["dry_run"] or v["help_config"]):
        raise ConfigError(f"--config and --workdir are required; e.g. {TRAIN_EXAMPLE}")
    return config, v["workdir"], v["stop_at_step"], v["dry_run"], v["help_config"]
