"""The ``kfor1`` command line.

Each task is a subcommand with its own module-level ``_add_<name>`` (arguments) and
``_run_<name>`` (action) pair registered in ``COMMANDS``; ``train``, ``eval``, ``export`` and
``params`` will join ``predict`` there. Mistakes a user can make (a wrong path, an unknown model,
a bad file) print one ``error: ...`` line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kfor1.predict import Prediction

# Errors kfor1 raises for bad user input: ValueError covers unknown models, ImageReadError,
# CheckpointFormatError and WeightMismatchError; the OSErrors cover paths.
USER_ERRORS = (
    ValueError, FileNotFoundError, IsADirectoryError, PermissionError, ModuleNotFoundError,
)


def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--model", default="efficientnet_lite0",
        help="registered model name (default: %(default)s)",
    )
    parser.add_argument(
        "--weights", metavar="PATH", default=None,
        help="PyTorch or Keras weights file (default: the model's pip-packaged weights)",
    )
    parser.add_argument(
        "--patch", metavar="DIR", default=None,
        help="a task patch (workdir/patches/<task>): classify into that task's classes",
    )
    parser.add_argument(
        "--top-k", type=_positive_int, default=5, metavar="K",
        help="classes to show per image (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N",
        help="images per forward pass (default: %(default)s)",
    )


def _run_predict(args: argparse.Namespace) -> int:
    from kfor1.models import load_pretrained
    from kfor1.predict import top_k

    if args.patch:
        from kfor1.patchfile import load_patched

        pretrained = load_patched(args.patch, weights=args.weights)
    else:
        pretrained = load_pretrained(args.model, args.weights)
    results = top_k(pretrained, args.images, k=args.top_k, batch_size=args.batch_size)
    blocks = [format_predictions(path, preds) for path, preds in zip(args.images, results)]
    print("\n\n".join(blocks))
    return 0


def format_predictions(path: str, predictions: Sequence[Prediction]) -> str:
    """The image path, then one aligned row per class: rank, probability, index, name."""
    index_width = max(len(str(p.class_index)) for p in predictions)
    rank_width = len(str(len(predictions)))
    lines = [path]
    for rank, p in enumerate(predictions, 1):
        lines.append(
            f"  {rank:>{rank_width}}  {100 * p.probability:6.2f}%  "
            f"{p.class_index:>{index_width}}  {p.class_name}"
        )
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file[:args], e.g. "
                        "configs/transfer.py:dataset=digits; --config.KEY=VALUE overrides")
    parser.add_argument("--workdir", required=True)


def _add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the --workdir of a `kfor1 train` run")
    parser.add_argument("--step", type=_positive_int, default=None,
                        help="checkpoint step (default: the latest)")


def _add_export(parser: argparse.ArgumentParser) -> None:
    _add_workdir(parser)
    parser.add_argument("--out", default=None, help="directory for patches/<task>/ "
                        "(default: the workdir)")


def _run_eval(args: argparse.Namespace) -> int:
    from kfor1.commands import evaluate_workdir

    results = evaluate_workdir(args.workdir, args.step)
    width = max(len(name) for name in results)
    print(f"{'task':<{width}}  accuracy     loss  examples")
    for name, r in results.items():
        print(f"{name:<{width}}  {100 * r['accuracy']:7.2f}%  {r['loss']:7.4f}  "
              f"{r['examples']:>8}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from kfor1.commands import export_workdir

    for name, path in export_workdir(args.workdir, args.out, args.step).items():
        print(f"{name}: {path}")
    return 0


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--patch", default="scale_bias+logits",
                        help="patch spec: presets joined by '+' (default: %(default)s)")
    parser.add_argument("--num-classes", type=_positive_int, default=1000)
    parser.add_argument("--head", default=None, help="classifier module (default: last Dense)")
    parser.add_argument("--all", action="store_true", help="also list every parameter")


def _run_params(args: argparse.Namespace) -> int:
    from kfor1.commands import params_report

    print(params_report(args.model, args.patch, args.num_classes, args.head, args.all))
    return 0


def _run_train(args: argparse.Namespace) -> int:  # pragma: no cover - dispatched in main().
    raise AssertionError("train is dispatched to kfor1.launcher before argparse")


COMMANDS: tuple[Command, ...] = (
    ("train", _add_train, _run_train),
    ("eval", _add_workdir, _run_eval),
    ("export", _add_export, _run_export),
    ("predict", _add_predict, _run_predict),
    ("params", _add_params, _run_params),
)

_HELP = {
    "train": "train task patches from a config (absl flags: --config.KEY=VALUE overrides)",
    "eval": "evaluate a run's latest (or --step) checkpoint on every task's test split",
    "export": "write patches/<task>/ patch files from a run's checkpoint",
    "predict": "print the top-k classes of image files (ImageNet, or a task with --patch)",
    "params": "show what a patch spec trains on a model: counts, bytes, K-task cost",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="kfor1", description="Parameter-efficient transfer learning of pretrained models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=_HELP.get(name), description=_HELP.get(name))
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line and returns the exit status (0 ok, 2 for usage or input errors)."""
    from kfor1.cpu import keep_freed_memory

    keep_freed_memory()  # This process is ours: see kfor1/cpu.py.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        # Training takes ml_collections' absl flags (--config.KEY=VALUE), which argparse
        # cannot express; the launcher parses them and exits with the run's status.
        from kfor1.launcher import run

        run(["kfor1 train", *argv[1:]])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and usage errors; return instead.
        return exit_.code if isinstance(exit_.code, int) else 2
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
