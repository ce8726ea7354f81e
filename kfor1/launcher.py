"""``python -m launch.train`` / ``kfor1 train``: an ml_collections config file and a workdir.

    python -m launch.train --config configs/transfer.py:dataset=digits,patch=logits \
        --workdir runs/digits --config.num_steps=300 --config.learning_rate.logits=1e-2

As in the flax examples, ``--config.key=value`` overrides any field, type-checked; the config is
locked, so an unknown key is an error. Mistakes users can make end in one ``error:`` line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from kfor1.cpu import keep_freed_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/transfer.py:dataset=digits",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, patches.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "End early at this step, after checkpointing (as a preemption would)."
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the input was wrong', reported without a traceback."""
    from kfor1.train import TrainingError

    return (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError,
            TrainingError)


def _main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    from absl import logging

    from kfor1.train import train

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    keep_freed_memory()
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    try:
        summary = train(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT.value)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "tasks" in summary:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    rows = [("task", "classes", "patch params", "patch file", "accuracy")]
    for name, t in summary["tasks"].items():
        rows.append((name, str(t["num_classes"]), f"{t['patch_parameters']:,}",
                     f"{t['patch_file_bytes'] / 1024:.1f} KiB", f"{100 * t['accuracy']:.2f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
    """Parses absl flags from ``argv`` (program name first) and trains; exits the process."""
    try:
        app.run(_main, argv=list(argv) if argv is not None else None)
    except flags.Error as e:  # Raised before app.run's own handler for some flag errors.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
