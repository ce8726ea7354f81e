"""``kfor1 eval``, ``export`` and ``predict``: the commands that read what others may have
written (a run directory, patch and base files).

Such files are read as hostile input (``kfor1.untrusted``, ``kfor1.files.patchcheck``): a user
model they name (``package.module:factory``) is imported only when the user names the same one
with ``--model``, and a patch without a content hash loads only with ``--allow-unverified``.
"""

from __future__ import annotations

import argparse
import json
import sys

from kfor1.errors import one_line
from kfor1.table import format_table


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- eval, export ----------------------------------------------------------------------------

MODEL_HELP = ("the user model (package.module:factory) the files record, named by you: kfor1 "
              "never imports code because a file names it")
UNVERIFIED_HELP = ("load patches that carry no content hash (older exports), with a warning, "
                   "instead of refusing them")


def add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the --workdir of a `kfor1 train` run")
    parser.add_argument("--step", type=positive_int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)


def run_eval(args: argparse.Namespace) -> int:
    from kfor1.trainer.workdir import evaluate_workdir

    results = evaluate_workdir(args.workdir, args.step, model=args.model)
    rows = [(name, f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}", r["examples"])
            for name, r in results.items()]
    print(format_table(("task", "accuracy", "loss", "examples"), rows))
    return 0


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="the --workdir of a `kfor1 train` run")
    parser.add_argument("--step", type=positive_int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output directory (patches: default the "
                        "workdir)")
    parser.add_argument("--format", choices=("patches", "savedmodel", "tflite"),
                        default="patches", help="patches/<task>/ from a checkpoint (default), "
                        "or every task in one TensorFlow SavedModel or TFLite file")
    parser.add_argument("--patch", metavar="DIR", action="append", default=None,
                        help="with --format savedmodel/tflite: a task's patch (repeat it; "
                        "default: every patch of --workdir)")
    parser.add_argument("--base", metavar="DIR", default=None,
                        help="the exported base the patches apply to (a train_shared run's)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)


def run_export(args: argparse.Namespace) -> int:
    if args.format != "patches":
        return _export_served(args)
    if not args.workdir:
        raise ValueError("kfor1 export needs --workdir (or --format savedmodel/tflite with "
                         "--patch DIR ...)")
    from kfor1.trainer.workdir import Workdir, export_workdir, load_config

    for name, path in export_workdir(args.workdir, args.out, args.step, args.model).items():
        print(f"{name}: {path}")
    if load_config(args.workdir, args.model).train_shared:
        print(f"trained base: {Workdir(args.out or args.workdir).base}")
    return 0


def _export_served(args: argparse.Namespace) -> int:
    import os

    from kfor1.serve.export import export
    from kfor1.serve.requests import open_server

    if not args.out:
        raise ValueError(f"--format {args.format} needs --out DIR")
    patches = args.patch
    if not patches:
        if not args.workdir:
            raise ValueError(f"--format {args.format} needs --patch DIR ... or --workdir")
        from kfor1.trainer.workdir import Workdir

        root = Workdir(args.workdir).patches
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{args.workdir} has no patches/; train or `kfor1 export "
                                    "--workdir` first")
        patches = [os.path.join(root, name) for name in sorted(os.listdir(root))]
    server = open_server(patches, base=args.base, model=args.model,
                         allow_unverified=args.allow_unverified)
    for kind, path in export(server, args.out, formats=(args.format,)).items():
        print(f"{kind}: {path}")
    for i, task in enumerate(sorted(server.tasks.values(), key=lambda t: t.slot)):
        print(f"  task id {i}: {task.name} ({len(task.class_names)} classes)")
    return 0


# --- predict ---------------------------------------------------------------------------------

def add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files (JPEG, PNG, ...); with several --patch, TASK=PATH")
    parser.add_argument("--model", default=None,
                        help="without --patch: the model for ImageNet predictions (default: "
                        "efficientnet_lite0); with --patch: " + MODEL_HELP)
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="PyTorch or Keras weights file (default: the model's pip-packaged "
                        "weights)")
    parser.add_argument("--patch", metavar="DIR", action="append", default=None,
                        help="a task patch (workdir/patches/<task>): classify into that task's "
                        "classes; repeat it to serve several tasks in one batch")
    parser.add_argument("--requests", metavar="FILE", default=None,
                        help="CSV (task,path) or JSON lines ({\"task\", \"path\"}) of images "
                        "to classify, each for its task")
    parser.add_argument("--base", metavar="DIR", default=None,
                        help="with --patch: the exported base it applies to (default: the one "
                        "its run wrote, for patches of a run that trained its backbone)")
    parser.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                        help="classes to show per image (default: 5, or all of a task's "
                        "classes if it has fewer)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)


def _check_top_k(top_k: int | None, classes: int, what: str) -> int:
    if top_k is not None and top_k > classes:
        raise ValueError(f"--top-k {top_k}: {what} has only {classes} classes; "
                         f"use --top-k {classes} or less")
    return top_k or min(5, classes)


def run_predict(args: argparse.Namespace) -> int:
    if not args.images and not args.requests:
        raise ValueError("give image files to classify (or --requests FILE)")
    if args.patch:
        return _predict_tasks(args)
    if args.base or args.requests:
        raise ValueError("--base and --requests need --patch: they are for tasks' patches")
    from kfor1.models import load_pretrained
    from kfor1.serve.predict import top_k

    pretrained = load_pretrained(args.model or "efficientnet_lite0", args.weights)
    k = _check_top_k(args.top_k, len(pretrained.class_names), pretrained.name)
    results = top_k(pretrained, args.images, k=k, batch_size=args.batch_size,
                    skip_unreadable=True)
    return _print_results(args, [
        {"path": path, "error": one_line(r)} if isinstance(r, Exception)
        else {"path": path, "top": [{"index": p.class_index, "name": p.class_name,
                                     "probability": p.probability} for p in r]}
        for path, r in zip(args.images, results)
    ], tagged=False)


def _predict_tasks(args: argparse.Namespace) -> int:
    """Images for one or more tasks' patches, served together (``kfor1.serve``)."""
    from kfor1.serve.requests import open_server, parse_tagged, predict_requests, read_requests

    server = open_server(args.patch, base=args.base, weights=args.weights, model=args.model,
                         allow_unverified=args.allow_unverified)
    tasks = server.tasks
    requests = parse_tagged(args.images, list(tasks))
    if args.requests:
        requests += read_requests(args.requests)
    # Each task shows up to k of its classes; a k beyond every task's classes is a mistake.
    widest = max(tasks.values(), key=lambda t: len(t.class_names))
    k = args.top_k or 5
    if len(tasks) == 1 or args.top_k is not None:
        k = _check_top_k(args.top_k, len(widest.class_names), f"task {widest.name!r}")
    results = predict_requests(server, requests, k=k, batch_size=args.batch_size,
                               skip_unreadable=True)
    return _print_results(args, results, tagged=len(tasks) > 1)


def _print_results(args: argparse.Namespace, results: list[dict], tagged: bool) -> int:
    """Prints the predictions (a table, or ``--json``); images that could not be read are
    reported on stderr, one line each, after the others are printed (exit status 2)."""
    from kfor1.serve.predict import format_results

    text = json.dumps(results, indent=2) if args.json else format_results(results, tagged)
    if text:
        print(text)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(results)} images could not be read (the others "
              "were classified); re-encode or remove them", file=sys.stderr)
    return 2 if failed else 0
