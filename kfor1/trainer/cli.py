"""The ``kfor1`` command line: ``train``, ``sweep``, ``eval``, ``export``, ``predict``, ``params``.

Each command is a pair in ``COMMANDS``: ``_add_<name>`` (its arguments) and ``_run_<name>`` (its
action); ``eval``, ``export`` and ``predict``, which read files others may have written, have
theirs in ``kfor1.trainer.cli_files``. ``train`` and ``sweep`` take an ml_collections config
file and absl-style overrides (``--config.KEY=VALUE``, type-checked against the locked config),
which argparse cannot express, so ``main`` parses them with absl before argparse sees them.
``python -m launch.<name>`` runs the same commands from a source checkout. Mistakes a user can
make (``kfor1.errors.USER_ERRORS``) print one ``error: ...`` line and exit with status 2,
whichever entry point ran them; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kfor1.errors import USER_ERRORS, one_line, quiet_library_logs
from kfor1.table import format_table
from kfor1.trainer.cli_files import (
    add_export,
    add_predict,
    add_workdir,
    positive_int,
    run_eval,
    run_export,
    run_predict,
)
from kfor1.trainer.flags import parse_train_args

# --- train -----------------------------------------------------------------------------------

def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file[:args], e.g. "
                        "configs/transfer.py:dataset=digits; --config.KEY=VALUE overrides")
    parser.add_argument("--workdir",
                        help="directory for checkpoints, metrics and patches (resumed if "
                        "present); required unless --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, build model, partition and optimiser from "
                        "shapes, report the weights and data it would read, and exit")
    parser.add_argument("--stop_at_step", type=positive_int, default=None,
                        help="end early at this step, after checkpointing (as a preemption "
                        "would); the same command without it resumes from there")
    parser.add_argument("--help-config", action="store_true",
                        help="print every config field, its value (after --config's args and "
                        "overrides) and what it means, and exit; without --config: defaults")


def _run_train(argv: Sequence[str]) -> int:
    from absl import logging

    from kfor1.trainer.loop import train

    config, workdir, stop_at_step, dry, help_config = parse_train_args(argv)
    if help_config:
        from kfor1.trainer.config_help import describe_config

        print(describe_config(config))
        return 0
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    if dry:
        from kfor1.trainer.dryrun import dry_run

        text, problems = dry_run(config)
        print(text)
        print(f"\n{len(problems)} problem(s) for this host" + "".join(
            f"\n- {p}" for p in problems) if problems else "\nready to train")
        return 0
    summary = train(config, workdir, stop_at_step=stop_at_step)
    if "tasks" in summary:
        print(format_summary(summary))
    return 0


# --- sweep -----------------------------------------------------------------------------------

SWEEP_EXAMPLE = ("kfor1 sweep --config configs/transfer.py:dataset=digits --patches "
                 "logits,scale_bias+logits --workdir runs/digits-sweep")


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a one-task config file[:args], e.g. "
                        "configs/transfer.py:dataset=digits; --config.KEY=VALUE overrides")
    parser.add_argument("--workdir", required=True, help="the sweep's directory (resumed if "
                        "present): runs/, sweep.json, sweep.md, sweep.png")
    parser.add_argument("--patches", help="presets to compare, separated by commas (default: "
                        "logits,input_stats+logits,stats+logits,bias+logits,scale_bias+logits,"
                        "depthwise+logits,"
                        "depthwise+scale_bias+logits,full)")
    parser.add_argument("--lrs", default="auto", help="learning-rate grid: auto (x0.33,x1,x3 "
                        "of each group's rate), factors (x0.5,x2) or rates (1e-3,1e-2)")


def _run_sweep(argv: Sequence[str]) -> int:
    from absl import logging

    from kfor1.trainer.config import ConfigError
    from kfor1.trainer.flags import parse_config_args
    from kfor1.trainer.sweep import DEFAULT_PATCHES, sweep

    config, v = parse_config_args(argv, "sweep", SWEEP_EXAMPLE,
                                  strings=("workdir", "patches", "lrs"),
                                  required="--config and --workdir are required")
    if not v["workdir"]:
        raise ConfigError(f"--config and --workdir are required; e.g. {SWEEP_EXAMPLE}")
    logging.set_verbosity(logging.WARNING)
    result = sweep(config, v["workdir"], DEFAULT_PATCHES if v["patches"] is None
                   else v["patches"], "auto" if v["lrs"] is None else v["lrs"])
    print(f"recommendation: {result['recommendation']}")
    for patch, edge in result.get("at_grid_edge", {}).items():
        print(f"note: {patch} chose the {edge} learning rate of the grid; the best may lie "
              "beyond it (sweep.md)", file=sys.stderr)
    print(f"see {v['workdir']}/sweep.md and sweep.png")
    return 0


def format_summary(summary: dict) -> str:
    """A run's summary (``kfor1.trainer.metrics.summary``) as a table, one row per task."""
    rows = [(name, t["num_classes"], f"{t['patch_parameters']:,}",
             f"{t['patch_file_bytes'] / 1024:.1f} KiB",
             f"{100 * t.get('accuracy', t.get('val_accuracy', 0.0)):.2f}%")
            for name, t in summary["tasks"].items()]
    column = "accuracy" if "accuracy" in summary["splits"] else "val accuracy"
    return format_table(("task", "classes", "patch params", "patch file", column), rows)


# --- params ----------------------------------------------------------------------------------

def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--patch", default="scale_bias+logits",
                        help="patch spec: presets joined by '+', or (regex, label) rules as a "
                        "JSON list, e.g. '[[\"head/.*\", \"patch\"], [\".*\", \"shared\"]]' "
                        "(default: %(default)s)")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--head", default=None, help="classifier module (default: last Dense)")
    parser.add_argument("--all", action="store_true", help="also list every parameter")


def _run_params(args: argparse.Namespace) -> int:
    from kfor1.patch.report import model_report
    from kfor1.patch.spec import PatchSpec

    spec = PatchSpec.from_text(args.patch)
    print(model_report(args.model, spec, args.num_classes, args.head, args.all))
    return 0


# --- the parser ------------------------------------------------------------------------------

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int] | None]

COMMANDS: tuple[Command, ...] = (
    ("train", "train task patches from a config (--config.KEY=VALUE overrides)",
     _add_train, None),  # Dispatched in main(), before argparse.
    ("sweep", "train every patch of a list at a small learning-rate grid, choose on "
     "validation, test the chosen once", _add_sweep, None),  # Dispatched in main(), too.
    ("eval", "evaluate a run's latest (or --step) checkpoint on every task's test split",
     add_workdir, run_eval),
    ("export", "write patches/<task>/ patch files from a run's checkpoint",
     add_export, run_export),
    ("predict", "print the top-k classes of image files (ImageNet, or a task with --patch)",
     add_predict, run_predict),
    ("params", "show what a patch spec trains on a model: counts, bytes, K-task cost",
     _add_params, _run_params),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command in ``COMMANDS``."""
    from kfor1 import __version__

    parser = argparse.ArgumentParser(
        prog="kfor1", description="Parameter-efficient transfer learning of pretrained models.",
    )
    parser.add_argument("--version", action="version", version=f"kfor1 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns the exit status (0 ok, 2 for usage or input errors)."""
    from kfor1.cpu import keep_freed_memory
    from kfor1.trainer.compile_cache import enable_compilation_cache

    keep_freed_memory()  # This process is ours: see kfor1/cpu.py.
    # Each step compiles once per machine: kfor1/trainer/compile_cache.py.
    enable_compilation_cache()
    quiet_library_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["train"], ["sweep"]) and not {"-h", "--help"} & set(argv):
            return (_run_train if argv[0] == "train" else _run_sweep)(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # argparse exits on --help and usage errors; return instead.
            return exit_.code if isinstance(exit_.code, int) else 2
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `kfor1 ... | head` stopped reading: not an error of kfor1's.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Exit's flush is quiet.
        return 0
    except OSError as exc:  # A full or read-only disk is the user's to fix; others are bugs.
        import errno

        from kfor1.files.atomic import is_disk_full

        if is_disk_full(exc):
            print(f"error: disk full: {one_line(exc)}; free space or use another directory",
                  file=sys.stderr)
        elif exc.errno == errno.EROFS:
            print(f"error: read-only file system: {one_line(exc)}; use a --workdir (or --out) "
                  "on a disk you can write to", file=sys.stderr)
        else:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
