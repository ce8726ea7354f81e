"""Learning-rate sweep per patch group on real data: the evidence behind ``DEFAULT_LEARNING_RATES``.

Trains EfficientNet-Lite0 patches (logits; scale_bias+logits; depthwise+scale_bias+logits; full
fine-tuning) on an image folder (by default the CIFAR-10 subset in /work/shared/data/cifar10,
upsampled), one run per learning-rate setting, sequentially, and reports test accuracy on the
*whole* test split. (``max_eval_examples`` takes the first N test images, and a folder's test
split is sorted by class, so a partial evaluation would see only the first few classes.)

Run from the repository root::

    python benchmarks/lr_sweep.py --resolution 64 --steps 300 --out docs/optimizer_defaults.md
    python benchmarks/lr_sweep.py --quick          # a smoke run of a few steps, writes nothing

Every run gets a fresh working directory (``train`` resumes from checkpoints it finds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import kfor1  # noqa: F401
except ModuleNotFoundError:  # Run as ``python benchmarks/lr_sweep.py`` from a checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfor1.trainer.config import DEFAULT_LEARNING_RATES, base_config, task  # noqa: E402

DEFAULT_DATA = "/work/shared/data/cifar10"

# (patch, {group: learning rate}); groups not named keep DEFAULT_LEARNING_RATES. The runs marked
# "follow-up" were added after a first pass, to bracket optima that fell on the grid's edge.
SWEEP: tuple[tuple[str, dict[str, float]], ...] = (
    ("logits", {"logits": 1e-3}),
    ("logits", {"logits": 3e-3}),
    ("logits", {"logits": 1e-2}),
    ("logits", {"logits": 3e-2}),
    ("scale_bias+logits", {"scale_bias": 3e-3, "logits": 3e-3}),
    ("scale_bias+logits", {"scale_bias": 1e-2, "logits": 3e-3}),
    ("scale_bias+logits", {"scale_bias": 3e-2, "logits": 3e-3}),
    ("scale_bias+logits", {"scale_bias": 1e-1, "logits": 3e-3}),  # follow-up
    ("scale_bias+logits", {"scale_bias": 3e-2, "logits": 1e-3}),  # follow-up
    ("scale_bias+logits", {"scale_bias": 3e-2, "logits": 3e-4}),  # follow-up
    ("scale_bias+logits", {"scale_bias": 1e-2, "logits": 1e-2}),
    ("scale_bias+logits", {"scale_bias": 3e-2, "logits": 1e-2}),
    ("depthwise+scale_bias+logits", {"depthwise": 3e-3, "scale_bias": 1e-2, "logits": 3e-3}),
    ("depthwise+scale_bias+logits",  # follow-up
     {"depthwise": 3e-3, "scale_bias": 3e-2, "logits": 3e-3}),
    ("full", {"full": 1e-4}),
    ("full", {"full": 3e-4}),
    ("full", {"full": 1e-3}),  # follow-up
)
# Rough cost of a 300-step run relative to scale_bias+logits (measured at 64 px on 2 shared CPU
# cores), used to skip runs that would not finish within --max-minutes.
RELATIVE_COST = {"logits": 0.4, "scale_bias+logits": 1.0, "depthwise+scale_bias+logits": 1.2,
                 "full": 1.3}
QUICK_SWEEP = (("logits", {"logits": 3e-3}), ("scale_bias+logits", {"scale_bias": 1e-2,
                                                                     "logits": 3e-3}))


def groups_of(patch: str) -> list[str]:
    """Optimiser groups a preset string creates, in its order ('full' claims every leaf)."""
    presets = [p for p in patch.split("+") if p and p != "none"]
    return presets[: presets.index("full") + 1] if "full" in presets else presets


def make_config(data: str, patch: str, rates: dict[str, float], *, resolution: int, steps: int,
                batch_size: int, warmup: int, seed: int):
    c = base_config()
    c.tasks = [task(f"folder:{data}", name="data", resolution=resolution)]
    c.patch = patch
    for group, lr in rates.items():
        c.learning_rate[group] = lr
    c.num_steps = steps
    c.batch_size = batch_size
    c.warmup_steps = warmup
    c.optimizer = "adamw"
    c.schedule = "cosine"
    c.augment.crop = "pad"
    c.augment.flip = True
    c.progress = False
    c.max_eval_examples = 0  # The whole test split: it is sorted by class (see the docstring).
    c.eval_batch_size = 100
    c.checkpoint_every = 10**9
    c.keep_checkpoints = 1
    c.log_every = max(1, min(50, steps // 4))
    c.seed = seed
    return c


def _train_images_per_s(workdir: str) -> float:
    """Mean training throughput over logging intervals, the first (compilation) left out."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    rates = rates[1:] or rates
    return sum(rates) / len(rates) if rates else float("nan")


def run_one(data: str, patch: str, rates: dict[str, float], *, resolution: int, steps: int,
            batch_size: int, warmup: int, seed: int, root: str) -> dict[str, Any]:
    from kfor1.trainer.loop import TrainingError, train

    full_rates = {g: rates.get(g, DEFAULT_LEARNING_RATES[g]) for g in groups_of(patch)}
    name = patch.replace("+", "-") + "_" + "_".join(f"{g}{lr:g}" for g, lr in full_rates.items())
    workdir = os.path.join(root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    config = make_config(data, patch, full_rates, resolution=resolution, steps=steps,
                         batch_size=batch_size, warmup=warmup, seed=seed)
    row: dict[str, Any] = {"patch": patch, "rates": full_rates, "steps": steps,
                           "resolution": resolution, "batch_size": batch_size, "seed": seed}
    start = time.perf_counter()
    try:
        summary = train(config, workdir)
        result = summary["tasks"]["data"]
        row.update(accuracy=result["accuracy"], eval_loss=result["loss"],
                   eval_examples=result["examples"],
                   patch_parameters=result["patch_parameters"],
                   patch_statistics=result.get("patch_statistics"), status="ok")
    except TrainingError as e:  # NaN loss: the learning rate is too high.
        row.update(accuracy=float("nan"), status=f"diverged: {e}".split(";")[0])
    row["minutes"] = (time.perf_counter() - start) / 60
    row["train_images_per_s"] = _train_images_per_s(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return row


_SIZES: dict[str, tuple[int, int]] = {}


def patch_size(patch: str, num_classes: int = 10) -> tuple[int, int]:
    """(trainable parameters, BatchNorm statistics) of one task's patch of EfficientNet-Lite0
    with a ``num_classes`` head, counted from the patch spec (independent of run summaries)."""
    if patch not in _SIZES:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from kfor1.models import create
        from kfor1.patch.spec import is_patch, partition, stats_labels
        from kfor1.tree import flatten

        model = create("efficientnet_lite0", num_classes=num_classes)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        labels = partition(shapes, patch)
        sizes = [
            sum(int(np.prod(leaf.shape)) for path, leaf in flatten(tree).items()
                if is_patch(flatten(tree_labels)[path]))
            for tree, tree_labels in ((shapes["params"], labels),
                                      (shapes["batch_stats"],
                                       stats_labels(shapes["batch_stats"], labels)))
        ]
        _SIZES[patch] = (sizes[0], sizes[1])
    return _SIZES[patch]


def _size_text(patch: str) -> str:
    params, stats = patch_size(patch)
    return f"{params:,}" + (f" (+{stats:,})" if stats else "")


def _rates_text(rates: dict[str, float]) -> str:
    return ", ".join(f"{g} {lr:g}" for g, lr in rates.items())


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    best: dict[str, float] = {}
    for r in rows:
        if r["status"] == "ok":
            best[r["patch"]] = max(best.get(r["patch"], 0.0), r["accuracy"])
    lines = [
        "| patch | learning rates | steps | test accuracy | patch params (+ BN stats) "
        "| train img/s | minutes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] == "ok":
            acc = f"{100 * r['accuracy']:.2f}%"
            if r["accuracy"] == best[r["patch"]]:
                acc = f"**{acc}**"
            params = _size_text(r["patch"])
        else:
            acc, params = r["status"], "-"
        mark = " (follow-up)" if r.get("pass", 1) > 1 else ""
        lines.append(
            f"| {r['patch']} | {_rates_text(r['rates'])}{mark} | {r['steps']} | {acc} | {params} "
            f"| {r['train_images_per_s']:.0f} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines)


def best_rates(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per patch, the row with the highest test accuracy."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] == "ok" and r["accuracy"] > out.get(r["patch"], {}).get("accuracy", -1):
            out[r["patch"]] = r
    return out


CAVEATS = """\
- **Short runs, one seed.** {steps} steps of batch {batch} is {epochs:.2f} epochs of the 20k-image
  subset. Differences of about a point between neighbouring learning rates may not survive a
  second seed or a longer schedule, and rates tuned for a few hundred steps need not be the best
  for the paper's schedules of tens of thousands of steps.
- **Low resolution, one data set.** CIFAR-10 images are 32x32, upsampled to {resolution} px, far
  from the backbone's 224 px ImageNet inputs. Other data may rank patches differently: on a tiny
  texture set (40 images per class) the guide found logits-only to win, while on a fine-grained
  set a PyTorch reference found BN scale/bias at 1e-2 with the head at 3e-3 about 6 points
  better than logits-only.
- **Shared CPU.** Throughput (img/s) and minutes were measured on 2 CPU cores shared with other
  processes (load average {load_before} before, {load_after} after); read them as rough
  relative costs, not benchmarks.
- **Untested groups.** `bias`, `patch` (rule-based specs) and `shared` (joint backbone training)
  were not swept.
"""


NOTES_HEADING = "## Chosen defaults"


def _best_line(rows: Sequence[dict[str, Any]], patch: str) -> str:
    best = best_rates(rows).get(patch)
    if best is None:
        return f"- `{patch}`: no successful run."
    notes = []
    for group, lr in best["rates"].items():
        tried = sorted({r["rates"][group] for r in rows if r["patch"] == patch})
        if len(tried) == 1:
            notes.append(f"`{group}` was not varied")
        elif lr in (tried[0], tried[-1]):
            edge = "highest" if lr == tried[-1] else "lowest"
            notes.append(f"`{group}` {lr:g} is the {edge} rate tried, the optimum may lie beyond")
    return (f"- `{patch}`: best at {_rates_text(best['rates'])} "
            f"({100 * best['accuracy']:.2f}%)" + (f"; {'; '.join(notes)}." if notes else "."))


RAW_BEGIN, RAW_END = "<!-- lr_sweep raw results", "end of raw results -->"


def raw_block(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as JSON in an HTML comment, so ``--from-json REPORT.md`` can rebuild them."""
    return f"{RAW_BEGIN}\n{json.dumps({'meta': meta, 'rows': list(rows)}, indent=1)}\n{RAW_END}"


def read_results(path: str) -> dict[str, Any]:
    """A ``--json`` file, or the raw block of a report written by this script."""
    text = Path(path).read_text()
    if RAW_BEGIN in text:
        text = text[text.index(RAW_BEGIN) + len(RAW_BEGIN):text.index(RAW_END)]
    return json.loads(text)


def document(rows: Sequence[dict[str, Any]], meta: dict[str, Any], notes: str = "") -> str:
    """The markdown report: setup, table, best rates per patch, notes and caveats."""
    patches = list(dict.fromkeys(r["patch"] for r in rows))
    defaults = ", ".join(f"`{g}` {lr:g}" for g, lr in DEFAULT_LEARNING_RATES.items())
    epochs = meta["steps"] * meta["batch_size"] / 20_000
    skipped = meta.get("skipped") or []
    parts = [
        "# Optimizer defaults: learning rates per patch group",
        "",
        "`kfor1.trainer.config.DEFAULT_LEARNING_RATES` gives every patch group (see "
        "`kfor1.patch.spec`) its own "
        "learning rate. This page is the experiment behind them. `benchmarks/lr_sweep.py` wrote "
        "everything but the hand-written *Chosen defaults* section; rerun the whole sweep, or "
        "only some of its runs (`--runs` takes indices into its `SWEEP` list), with",
        "",
        "```bash",
        f"python benchmarks/lr_sweep.py --resolution {meta['resolution']} --steps {meta['steps']} "
        "--json new.json",
        "python benchmarks/lr_sweep.py --from-json docs/optimizer_defaults.md,new.json "
        "--out docs/optimizer_defaults.md",
        "```",
        "",
        "The second command merges new runs into this page (its raw results are embedded at the "
        "end) and keeps the *Chosen defaults* section.",
        "",
        f"Defaults at the time of the sweep: {defaults}.",
        "",
        "## Setup",
        "",
        (f"- **Data**: the CIFAR-10 subset in `{meta['data']}` (JPEG image folders: 20,000 "
         "train images = the first 2,000 per class, 5,000 test images = the first 500 per "
         "class), upsampled from 32x32"
         if meta["data"] == DEFAULT_DATA else f"- **Data**: the image folder `{meta['data']}`, "
         "resized")
        + f" to {meta['resolution']}x{meta['resolution']} px (bicubic). "
        "Training augmentation: pad-and-crop (1/8 of the side) and horizontal flips; evaluation "
        "on whole images.",
        "- **Evaluation**: accuracy on **all** test images (`max_eval_examples = 0`). The "
        "test folder is read in class order and `max_eval_examples = N` keeps the first N images, "
        "so e.g. N = 2000 would score only airplane, automobile, bird and cat.",
        "- **Model**: EfficientNet-Lite0 with the pip-packaged ImageNet weights, frozen except "
        "for the patch; a new zero-initialised 10-class head (`logits`); BatchNorm momentum 0.9 "
        "(`bn_momentum`); patches with `scale_bias` also own their BatchNorm statistics and run "
        "BatchNorm in training mode, `logits` alone runs the backbone in inference mode.",
        f"- **Optimizer**: AdamW (weight decay 0), one per patch group; cosine decay to 0 after "
        f"{meta['warmup']} linear warm-up steps.",
        f"- **Schedule**: {meta['steps']} steps of batch {meta['batch_size']} "
        f"({epochs:.2f} epochs), seed {meta['seed']}, float32.",
        f"- **Machine**: {meta['cpu_count']} CPU cores ({meta['device']}), shared with other "
        f"processes; JAX {meta['jax_version']}, Python {meta['python']}; {meta['date']}. "
        f"Total wall time of the sweep: {meta['total_minutes']:.1f} minutes.",
        "",
        "## Results",
        "",
        "Test accuracy on the whole test split; the best run per patch is in bold. *patch "
        "params* are the task's trainable parameters, plus in brackets the BatchNorm statistics "
        "it owns (a patch file stores both). *train img/s* excludes the first (compiling) "
        "logging interval; *minutes* is the whole run (loading, compilation, training, "
        "evaluation, export)."
        + (f" The sweep ran in {meta['passes']} passes: runs marked *follow-up* were added after "
           "the first pass, to bracket optima that fell on the edge of its grid."
           if meta.get("passes", 1) > 1 else ""),
        "",
        markdown_table(rows),
        "",
    ]
    if skipped:
        parts += ["Not run (the sweep's time limit was reached): "
                  + "; ".join(f"{p} [{_rates_text(r)}]" for p, r in skipped) + ".", ""]
    parts += ["Best per patch:", ""] + [_best_line(rows, p) for p in patches] + [""]
    if notes:
        parts += [NOTES_HEADING, "", notes.strip(), ""]
    parts += [
        "## Caveats",
        "",
        CAVEATS.format(steps=meta["steps"], batch=meta["batch_size"], epochs=epochs,
                       resolution=meta["resolution"],
                       load_before=", ".join(f"{x:.1f}" for x in meta["load_average_before"]),
                       load_after=", ".join(f"{x:.1f}" for x in meta["load_average_after"])),
    ]
    parts += ["", raw_block(rows, meta), ""]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="image folder with train/ and test/")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="",
                        help="comma-separated indices into the sweep (default: all)")
    parser.add_argument("--max-minutes", type=float, default=28.0,
                        help="start no further run after this many minutes (0: no limit)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 settings, a few steps, resolution 32")
    parser.add_argument("--out", default="", help="write the markdown report here")
    parser.add_argument("--notes", default="",
                        help="a markdown file whose text becomes the 'Chosen defaults' section "
                        "(default: keep that section of an existing --out file)")
    parser.add_argument("--json", default="", help="write the raw results here")
    parser.add_argument("--from-json", default="",
                        help="rebuild the report from --json files or earlier reports "
                        "(comma-separated, merged in order) instead of training")
    parser.add_argument("--workdir", default="", help="scratch space (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.resolution, args.warmup = 6, 32, 2
    return args


def _estimate(rows: Sequence[dict[str, Any]], patch: str) -> float:
    """Minutes the next ``patch`` run will likely take, from the runs so far (0: no data)."""
    same = [r["minutes"] for r in rows if r["patch"] == patch]
    if same:
        return max(same)
    scaled = [r["minutes"] * RELATIVE_COST.get(patch, 1.0) / RELATIVE_COST.get(r["patch"], 1.0)
              for r in rows]
    return max(scaled, default=0.0)


def _sweep_index(row: dict[str, Any]) -> int:
    for i, (patch, rates) in enumerate(SWEEP):
        if patch == row["patch"] and all(row["rates"].get(g) == lr for g, lr in rates.items()):
            return i
    return len(SWEEP)


def merge(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of several sweeps (e.g. a first pass and its follow-up) in sweep order; the meta of
    the first, with the total time and load averages of all."""
    rows, offset = [], 0
    for res in results:  # A merged report counts as its passes.
        rows += [{**r, "pass": offset + r.get("pass", 1)} for r in res["rows"]]
        offset += res["meta"].get("passes", 1)
    rows.sort(key=_sweep_index)
    meta = dict(results[0]["meta"])
    meta["total_minutes"] = sum(res["meta"]["total_minutes"] for res in results)
    meta["load_average_after"] = results[-1]["meta"]["load_average_after"]
    ran = {(r["patch"], json.dumps(r["rates"], sort_keys=True)) for r in rows}
    meta["skipped"] = [
        (p, rates) for res in results for p, rates in res["meta"].get("skipped", [])
        if (p, json.dumps({**{g: DEFAULT_LEARNING_RATES[g] for g in groups_of(p)}, **rates},
                          sort_keys=True)) not in ran
    ]
    meta["passes"] = offset
    return rows, meta


def _existing_notes(path: str) -> str:
    """The hand-written 'Chosen defaults' section of an existing report, to keep it."""
    if not os.path.exists(path):
        return ""
    text = Path(path).read_text()
    start = text.find(NOTES_HEADING)
    if start < 0:
        return ""
    body = text[start + len(NOTES_HEADING):]
    end = body.find("\n## ")
    return (body if end < 0 else body[:end]).strip()


def _write_outputs(args: argparse.Namespace, rows, meta) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.out:
        sources = [args.out] + (args.from_json.split(",") if args.from_json else [])
        notes = Path(args.notes).read_text() if args.notes else next(
            (n for n in map(_existing_notes, sources) if n), "")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(document(rows, meta, notes))
        print(f"wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    args = parse_args(argv)
    if args.from_json:
        rows, meta = merge([read_results(f) for f in args.from_json.split(",")])
        print(markdown_table(rows))
        args.json = ""
        _write_outputs(args, rows, meta)
        return 0

    import jax

    sweep = QUICK_SWEEP if args.quick else SWEEP
    if args.runs:
        sweep = tuple(sweep[int(i)] for i in args.runs.split(","))
    root = args.workdir or tempfile.mkdtemp(prefix="lr_sweep_")
    print(f"device: {jax.devices()[0]} x{jax.device_count()}, cpus: {os.cpu_count()}, "
          f"data: {args.data}, resolution {args.resolution}, {args.steps} steps of "
          f"{args.batch_size}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows, skipped = [], []
    for patch, rates in sweep:
        elapsed = (time.perf_counter() - started) / 60
        if args.max_minutes and elapsed + _estimate(rows, patch) > args.max_minutes:
            skipped.append((patch, rates))
            print(f"skipped (time limit): {patch} [{_rates_text(rates)}]", flush=True)
            continue
        row = run_one(args.data, patch, rates, resolution=args.resolution, steps=args.steps,
                      batch_size=args.batch_size, warmup=args.warmup, seed=args.seed, root=root)
        rows.append(row)
        print(f"{patch} [{_rates_text(row['rates'])}]: {row['status']}, accuracy "
              f"{row['accuracy']:.4f}, {row['train_images_per_s']:.0f} img/s, "
              f"{row['minutes']:.2f} min", flush=True)
    total_minutes = (time.perf_counter() - started) / 60
    print(markdown_table(rows))
    print(f"total: {total_minutes:.1f} min")
    meta = {
        "data": args.data, "resolution": args.resolution, "steps": args.steps,
        "batch_size": args.batch_size, "warmup": args.warmup, "seed": args.seed,
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "total_minutes": total_minutes,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "skipped": skipped,
    }
    _write_outputs(args, rows, meta)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
