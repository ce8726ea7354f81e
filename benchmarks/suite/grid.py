"""Benchmark suite: kfor1 against PyTorch on EfficientNet-Lite0 and MobileNetV2 1.0 (the paper's
base), over a grid of models, resolutions, batch sizes and precisions, and kfor1 against itself.

Each cell of the grid (``--model``, ``--resolution``, ``--batch`` and ``--precision`` take
comma-separated lists) runs six sections in one process (``--only`` picks some):

1. ``patch_step``: a ``scale_bias+logits`` training step (frozen shared network, BatchNorm in
   training mode, AdamW), kfor1 (``make_train_step``, K = 1) against PyTorch at its fastest;
2. ``inference``: eval-mode forward pass, jitted ``model.apply`` in micro-batches (as kfor1's
   inference functions run it on CPU) against ``torch.inference_mode``;
3. ``full_step``: full fine-tuning (every parameter trained), and the patch step against it;
4. ``k_tasks``: one step that trains K patches, images/s relative to K = 1, the memory of the
   K-task state against K single-task states and K full models, and each step's compile time;
5. ``patch_files``: the size of an exported patch for each preset, against the full checkpoint;
6. ``flops``: FLOPs per step (XLA's cost analysis, and counted from the parameter shapes),
   achieved GFLOP/s per path, against a matmul peak measured on the same machine.

The run ends with one table, a row per cell, of every ratio against its target (issue 15's:
``suite_sections.TARGETS``); ``--json`` writes every measurement beside it.

PyTorch runs the same network (``benchmarks/suite/torch_lite.py`` or ``torch_mobilenet.py``, the
real packaged weights) the fastest way eager PyTorch offers: channels_last tensors, padding inside
``nn.Conv2d`` (symmetric ``k // 2``: for Lite not TensorFlow's SAME at stride 2, so the outputs
shift by a pixel, but the FLOPs are the same; for MobileNetV2 torchvision's own, exact
definition), ``requires_grad=False`` on frozen parameters, fused AdamW, all cores; on a GPU
(``--torch-device``, by default the GPU when JAX runs on one) CUDA with TF32 matrix products,
as JAX's default precision computes float32 products there. ``--precision bfloat16`` computes
in bfloat16 on both sides with float32 parameters: kfor1's ``dtype=bfloat16`` against
``torch.autocast`` (AMP).

Every measurement runs untimed warm-up steps, then timed repetitions, each one untimed "settle"
step (the first step after switching workloads is slower) and timed steps ending in
``jax.block_until_ready`` (on a GPU PyTorch's steps end in ``torch.cuda.synchronize``); tables
give the median repetition and the fastest. Repetitions alternate between the workloads
compared in a section (kfor1 and PyTorch), so load from other processes slows both. kfor1
functions are compiled ahead of time (``jit(...).lower(...).compile()``, the executable a first
call would build), which gives XLA's cost analysis and keeps compilation out of the timing.

Run from the repository root (results and how to read them: ``benchmarks/README.md``)::

    python -m benchmarks.suite --resolution 128 --batch 32 --json suite.json
    python -m benchmarks.suite --model efficientnet_lite0,mobilenet_v2 --resolution 128,224 \\
        --batch 32,128 --json grid.json                  # the grid of issue 15
    python -m benchmarks.suite --only patch_step,inference --ks 1,2,4
    python -m benchmarks.suite --tiny   # 32 px, batch 2, 1 step: only checks that it runs
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import torch

from benchmarks import common
from benchmarks.common import ROOT, write_json
from benchmarks.suite.bench import MODELS, Bench, torch_device
from benchmarks.suite.sections import (
    PRESETS,
    SECTION_FUNCTIONS,
    SECTIONS,
    TARGETS,
)
from kfor1.cpu import keep_freed_memory

__all__ = ["PRESETS", "SECTIONS", "TARGETS", "main", "run_cell", "summary_table"]
PRECISIONS = ("float32", "bfloat16")


def _list(kind: type, choices: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> list:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a comma-separated list" + (
                    f" from {', '.join(choices)}" if choices else ""))
        return values
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=_list(str, sorted(MODELS)), default=["efficientnet_lite0"],
                        help="networks, with their packaged ImageNet weights (default: "
                        "efficientnet_lite0; mobilenet_v2 is the paper's base)")
    parser.add_argument("--resolution", type=_list(int), default=[128], help="e.g. 128,224")
    parser.add_argument("--batch", type=_list(int), default=[32],
                        help="images per step (per task), e.g. 32,128")
    parser.add_argument("--precision", type=_list(str, PRECISIONS), default=["float32"],
                        help="compute precisions (parameters stay float32): float32,bfloat16")
    parser.add_argument("--torch-device", default="auto",
                        help="PyTorch's device: auto (the GPU where JAX runs on one), cpu, cuda")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ks", type=_list(int), default=[1, 2, 4, 8],
                        help="task counts of the k_tasks section, e.g. 1,2,4,8")
    parser.add_argument("--steps", type=int, default=1, help="training steps per repetition")
    parser.add_argument("--infer-steps", type=int, default=5,
                        help="inference steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per workload")
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions (median)")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed steps before each repetition (after switching workload)")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of idle before each repetition, so that the worker "
                        "threads of the workload before (PyTorch's OpenMP, XLA's pool) stop "
                        "spinning: without it kfor1's inference ran at 772 img/s, with it 976")
    parser.add_argument("--keep-heap", action="store_true",
                        help="do not return freed memory to the OS between workloads (the "
                        "suite's method before 2026-12-04: kfor1's and PyTorch's buffers then "
                        "share one fragmented heap; see benchmarks/README.md)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the peak's square matmul (default 2048 on a CPU, 8192 on "
                        "an accelerator)")
    parser.add_argument("--only", type=_list(str, SECTIONS), default=list(SECTIONS),
                        help=f"sections, from {','.join(SECTIONS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--in-process", action="store_true",
                        help="run every cell in this process (by default a grid of several "
                        "cells runs each in a fresh one: its memory is the cell's alone, and a "
                        "cell that fails, out of memory say, is reported and the grid goes on)")
    parser.add_argument("--cell-json", metavar="PATH", help=argparse.SUPPRESS)  # One cell's.
    parser.add_argument(
        "--tiny", action="store_true",
        help="32 px, batch 2, K=1,2, 1 step, 1 warmup, 1 repeat, unoptimised XLA compilation: "
        "checks that the code runs (its numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.batch, args.ks = [32], [2], [1, 2]
        args.steps = args.infer_steps = args.warmup = args.repeats = 1
        args.settle = 0
        args.pause = 0.0
        args.matmul_size = 256
    if args.matmul_size is None:
        args.matmul_size = 2048 if jax.default_backend() == "cpu" else 8192
    for name in ("classes", "steps", "infer_steps", "repeats", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.resolution) < 1 or min(args.batch) < 1:
        parser.error("--resolution and --batch must be positive")
    if args.warmup < 1 or args.settle < 0 or args.pause < 0:
        parser.error("--warmup must be at least 1, --settle and --pause at least 0")
    if min(args.ks) < 1 or args.ks[0] != 1:
        parser.error("--ks must start with 1 (the baseline), e.g. 1,2,4")
    try:
        device = torch_device(args.torch_device)
    except RuntimeError as error:
        parser.error(f"--torch-device {args.torch_device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--torch-device cuda: this PyTorch sees no GPU; use cpu or auto")
    return args


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks.common.machine()`` and PyTorch's side: its device, threads and versions."""
    device = torch_device(args.torch_device)
    return {
        **common.machine(), "jax_device_kind": jax.devices()[0].device_kind,
        "torch_device": str(device),
        "torch_device_name": (torch.cuda.get_device_name() if device.type == "cuda"
                              else platform.processor() or "cpu"),
        "torch_threads": torch.get_num_threads(),
        "flax_version": flax.__version__, "torch_version": torch.__version__,
        # Allocator and threading settings change CPU timings (see benchmarks/README.md).
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(
            ("MALLOC_", "XLA_FLAGS", "LD_PRELOAD", "OMP_", "MKL_", "TF_CPP"))},
    }


def _cell_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("json", "cell_json")}


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected section for one cell (``args`` with one model, resolution, batch and
    precision); prints each section's table as it finishes."""
    print(f"\n# {args.model}, {args.resolution} px, batch {args.batch}, {args.precision}; "
          f"{args.classes} classes; {args.warmup} warm-up steps, {args.repeats} repetitions of "
          f"{args.settle} untimed + {args.steps} training / {args.infer_steps} inference steps",
          flush=True)
    cell: dict[str, Any] = {
        "config": _cell_config(args),
        "load_average_before": os.getloadavg(), "sections": {},
    }
    bench = Bench(args)
    if set(args.only) & {"patch_step", "inference", "full_step", "flops"}:
        # PyTorch is compared only if it computes what kfor1 does.
        checks = bench.check_torch_matches()
        fast = (f", fast (symmetric padding) {checks['torch_fast_max_abs_diff']:.2e}"
                if bench.reference.fast_differs else " (padding in conv: torchvision's own)")
        print(f"check: max |torch - kfor1| eval logits: exact "
              f"{checks['torch_exact_max_abs_diff']:.2e}{fast}; logit std "
              f"{checks['logit_std']:.2f}", flush=True)
    for name in SECTIONS:
        if name not in args.only:
            continue
        title, function = SECTION_FUNCTIONS[name]
        load_before, start = os.getloadavg(), time.perf_counter()
        section, text = function(bench)
        bench.release()  # The next section builds what it needs: see Bench.release.
        section.update(load_average_before=load_before, load_average_after=os.getloadavg(),
                       wall_s=time.perf_counter() - start)
        cell["sections"][name] = bench.results[name] = section
        print(f"\n## {title} (`{name}`)\n\n{text}\n\nload average {load_before[0]:.2f} -> "
              f"{os.getloadavg()[0]:.2f}, {section['wall_s']:.0f} s", flush=True)
    cell["checks"] = bench.results.get("checks", {})
    cell["load_average_after"] = os.getloadavg()
    return cell


def cell_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments of one cell (``args`` with one value per grid option)."""
    argv = ["--model", args.model, "--resolution", str(args.resolution), "--batch",
            str(args.batch), "--precision", args.precision, "--only", ",".join(args.only),
            "--ks", ",".join(map(str, args.ks))]
    for name in ("torch_device", "classes", "steps", "infer_steps", "warmup", "repeats",
                 "settle", "pause", "matmul_size"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + (["--tiny"] if args.tiny else []) + (["--keep-heap"] if args.keep_heap else [])


def run_cell_process(args: argparse.Namespace) -> dict[str, Any]:
    """``run_cell`` in a fresh Python process; a cell that fails is returned with its error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cell.json")
        done = subprocess.run([sys.executable, "-m", "benchmarks.suite", *cell_argv(args),
                               "--cell-json", path], cwd=ROOT, check=False)
        if done.returncode == 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    reason = (" (killed: out of memory?)" if done.returncode == -signal.SIGKILL else "")
    error = f"exit {done.returncode}{reason}"
    print(f"\ncell {args.model}, {args.resolution} px, batch {args.batch}, {args.precision} "
          f"failed: {error}", flush=True)
    return {"config": _cell_config(args),
            "error": error, "sections": {}}


def _mark(value: float | None, target: float, upper: bool = False) -> str:
    if value is None:
        return "-"
    met = value <= target if upper else value >= target
    return f"{value:.2f}{'' if met else ' ✗'}"


def summary_table(cells: Sequence[dict[str, Any]]) -> str:
    """One row per cell: each ratio with ✗ where it misses its target (the header gives it)."""
    t = TARGETS
    header = (
        f"| model | px | batch | precision | patch step kfor1/torch (>= {t['patch_step']}) "
        f"| full step (>= {t['full_step']}) | inference (>= {t['inference']}) "
        f"| worst K vs K=1 (>= {t['k_tasks']}) | inference of peak (>= {t['inference_peak']}) "
        f"| patch step of peak (>= {t['patch_step_peak']}) "
        f"| compile K=1 s (<= {t['compile_k1_s']:g}) | compile K=8 s (<= {t['compile_k8_s']:g}) |"
    )
    rows = [header, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        c, s = cell["config"], cell["sections"]
        if "error" in cell:
            rows.append(f"| {c['model']} | {c['resolution']} | {c['batch']} | {c['precision']} "
                        f"| failed: {cell['error']} |" + " |" * 7)
            continue
        by_k = s.get("k_tasks", {}).get("by_k", {})
        share = s.get("flops", {}).get("kfor1_fraction_of_peak", {})
        rows.append(
            f"| {c['model']} | {c['resolution']} | {c['batch']} | {c['precision']} "
            f"| {_mark(s.get('patch_step', {}).get('ratio'), t['patch_step'])} "
            f"| {_mark(s.get('full_step', {}).get('ratio'), t['full_step'])} "
            f"| {_mark(s.get('inference', {}).get('ratio'), t['inference'])} "
            f"| {_mark(s.get('k_tasks', {}).get('worst_relative'), t['k_tasks'])} "
            f"| {_mark(share.get('inference'), t['inference_peak'])} "
            f"| {_mark(share.get('patch step'), t['patch_step_peak'])} "
            f"| {_mark(by_k.get(1, {}).get('compile_s'), t['compile_k1_s'], upper=True)} "
            f"| {_mark(by_k.get(8, {}).get('compile_s'), t['compile_k8_s'], upper=True)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected sections in every cell; prints a markdown table per section and the
    summary table; optionally writes JSON."""
    args = parse_args(argv)
    # As kfor1's entry points do; PyTorch, in the same process, gets the same allocator.
    kept = keep_freed_memory()
    torch.set_num_threads(os.cpu_count() or 1)  # XLA:CPU uses every core by default.
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default precision on a GPU.
    info = machine(args)
    info["keep_freed_memory"] = kept
    print(f"jax device: {info['device']} ({info['platform']}, "
          f"{info['jax_device_kind']}), torch device: {info['torch_device']} "
          f"({info['torch_device_name']}, {info['torch_threads']} threads), {info['cpu_count']} "
          f"CPU cores, jax {info['jax_version']}, flax {info['flax_version']}, torch "
          f"{info['torch_version']}, load average {os.getloadavg()}", flush=True)
    print(f"environment: {info['environment'] or '(no allocator/threading variables set)'}; "
          f"glibc keeps freed memory: {kept}", flush=True)
    results: dict[str, Any] = {
        "machine": info, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average_before": os.getloadavg(), "cells": [],
    }
    grid = list(itertools.product(args.model, args.resolution, args.batch, args.precision))
    in_process = args.in_process or len(grid) == 1
    for model, resolution, batch, precision in grid:
        cell_args = argparse.Namespace(**{**vars(args), "model": model, "resolution": resolution,
                                          "batch": batch, "precision": precision})
        if in_process:
            cell = run_cell(cell_args)
            gc.collect()  # The cell's compiled steps and device buffers, before the next one.
            jax.clear_caches()
        else:
            cell = run_cell_process(cell_args)
        results["cells"].append(cell)
    if args.cell_json:
        write_json(args.cell_json, results["cells"][0])
        return 0
    results["summary"] = summary_table(results["cells"])
    results["load_average_after"] = os.getloadavg()
    print(f"\n# Summary (✗: target missed)\n\n{results['summary']}", flush=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
