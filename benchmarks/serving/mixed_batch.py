"""Serving benchmark: a mixed-task batch in one ``PatchServer`` call, against the single-task
model and against K separate task models run group by group.

For each resolution, batch size, task count K and patch spec, a batch's examples are drawn
uniformly from K tasks (EfficientNet-Lite0, the packaged ImageNet weights, 10-class heads):

- **mixed**: ``server.predict(images, tasks)``, the whole batch in one compiled call;
- **single**: the same batch through one task's model (``load_patched``'s ``Pretrained``):
  the cost the mixed call aims at;
- **per group**: each task's examples through that task's own model (K full models in
  memory), as a server without patch tables would run them.

It also weighs the patch table against K full models and times ``add`` (one patch into a
table of K - 1). Each timed call ends in ``block_until_ready``; warm-up calls compile every
shape first (the draw of tasks is fixed per configuration, so the group sizes repeat).

Run from the repository root (results: ``benchmarks/README.md``)::

    python -m benchmarks.serving                      # 128 and 224 px, batch 32 and 128, K=1..64
    python -m benchmarks.serving --resolutions 128 --batches 32 --ks 1,16 --json serve.json
    python -m benchmarks.serving --tiny               # only checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import kfor1
from benchmarks.common import write_json
from kfor1.cpu import keep_freed_memory
from kfor1.files.patchfile import apply_patch, make_patch
from kfor1.models import Preprocessing, Pretrained
from kfor1.serve import PatchServer

MODEL = "efficientnet_lite0"
CLASSES = 10
SPECS = ("scale_bias+logits", "depthwise+scale_bias+logits")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", type=_ints, default=[128, 224])
    parser.add_argument("--batches", type=_ints, default=[32, 128])
    parser.add_argument("--ks", type=_ints, default=[1, 4, 16, 64])
    parser.add_argument("--specs", type=lambda s: s.split(","), default=list(SPECS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--tiny", action="store_true",
                        help="32 px, batch 8, K=1,4, one repetition: checks that it runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolutions, args.batches, args.ks = [32], [8], [1, 4]
        args.warmup, args.repeats = 1, 1
    if min(args.ks) < 1 or min(args.batches) < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--ks, --batches, --repeats and --warmup must be positive")
    return args


def timed(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
          ) -> dict[str, list[float]]:
    """Seconds per call of each function; repetitions alternate between them, so that a slow
    spell of the machine slows all of them (the comparison is paired)."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def tree_bytes(tree: Any) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def task_patches(base: Pretrained, spec: str, k: int, resolution: int) -> list[Any]:
    """K patches of ``spec`` on ``base`` (a fresh K-task state: the values do not change the
    timing), in the format ``export_patch`` writes."""
    labels = kfor1.partition(base.variables, spec)
    tasks = [kfor1.Task(f"task{i}", CLASSES, resolution) for i in range(k)]
    state = kfor1.init_multitask(base.variables, labels, tasks,
                                 kfor1.patch_optimizer(optax.sgd(0.0), labels))
    meta = {"preprocessing": {**base.preprocessing.to_dict(), "resolution": resolution},
            "base": {"model": MODEL}}
    return [make_patch(state, i, {**meta, "class_names": [f"c{j}" for j in range(CLASSES)]})
            for i in range(k)]


def task_model(base: Pretrained, patch: Any) -> Pretrained:
    # At the patch's resolution, as load_patched gives it (Pretrained refuses other sizes).
    return Pretrained(patch.meta["task"], base.model.clone(num_classes=CLASSES),
                      apply_patch(base.variables, patch),
                      Preprocessing.from_dict(patch.meta["preprocessing"]),
                      patch.class_names, "benchmark")


def run_config(base: Pretrained, spec: str, resolution: int, batch: int, k: int,
               args: argparse.Namespace, models: dict[str, Pretrained]) -> dict[str, Any]:
    rng = np.random.default_rng(resolution * 1000 + batch + k)
    patches = task_patches(base, spec, max(k, 1), resolution)
    images = rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    names = [f"task{i}" for i in rng.integers(0, k, batch)]
    server = PatchServer(base, patches, capacity=k, max_batch=max(batch, 8))
    for p in patches:
        models.setdefault(p.meta["task"], task_model(base, p))
    single_model = models["task0"]
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in sorted(set(names))}

    def per_group():
        return [models[n].predict(images[rows]) for n, rows in groups.items()]

    times = timed({"mixed": lambda: server.predict(images, names).probabilities,
                   "single": lambda: single_model.predict(images), "per_group": per_group},
                  args.warmup, args.repeats)
    ratios = [s / m for m, s in zip(times["mixed"], times["single"])]
    # add: one patch into a table of K - 1 (the first add of a leaf set also hashes the base).
    server.remove("task0")
    add_s = []
    for _ in range(max(args.repeats, 3)):
        start = time.perf_counter()
        server.add(patches[0])
        jax.block_until_ready(server.table)
        add_s.append(time.perf_counter() - start)
        server.remove("task0")
    table = tree_bytes(server.table)
    full = tree_bytes(base.variables)
    return {
        "spec": spec, "resolution": resolution, "batch": batch, "k": k,
        "mixed_images_per_s": batch / statistics.median(times["mixed"]),
        "single_images_per_s": batch / statistics.median(times["single"]),
        "per_group_images_per_s": batch / statistics.median(times["per_group"]),
        # Per repetition, single-task time / mixed time: the paired ratio, median and best.
        "mixed_vs_single": statistics.median(ratios), "mixed_vs_single_best": max(ratios),
        "groups": len(groups), "table_bytes": table, "shared_bytes": tree_bytes(server.shared),
        "k_full_models_bytes": k * full, "add_ms_median": 1000 * statistics.median(add_s),
        "compiled_variants": server._compiled._cache_size(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| spec | px | batch | K | mixed img/s | single img/s | mixed / single, paired median "
        "(best) | per-group img/s (groups) | table MiB | K full models MiB | add ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['spec']} | {r['resolution']} | {r['batch']} | {r['k']} | "
            f"{r['mixed_images_per_s']:.1f} | {r['single_images_per_s']:.1f} | "
            f"**{r['mixed_vs_single']:.2f}x** ({r['mixed_vs_single_best']:.2f}) | "
            f"{r['per_group_images_per_s']:.1f} ({r['groups']}) | "
            f"{r['table_bytes'] / 2**20:.2f} | {r['k_full_models_bytes'] / 2**20:.1f} | "
            f"{r['add_ms_median']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    print(f"jax {jax.__version__} on {jax.devices()[0]}; {MODEL}, {CLASSES}-class heads; "
          f"{args.warmup} warm-up and {args.repeats} timed calls per row", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = kfor1.load_pretrained(MODEL)
    rows = []
    for resolution in args.resolutions:
        for spec in args.specs:
            models: dict[str, Pretrained] = {}
            for batch in args.batches:
                for k in args.ks:
                    row = run_config(base, spec, resolution, batch, k, args, models)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    write_json(args.json, {"config": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
