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

COMMANDS: tuple[Command, ...] = (
    ("predict", _add_predict, _run_predict),
)

_HELP = {
    "predict": "print the top-k classes of image files",
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
