"""Where the time goes: each path's compiled ops, timed by JAX's profiler, by kind of work.

For the inference, ``scale_bias+logits`` patch step and full step of the suite (same model,
resolution and batch), this traces ``--steps`` executions with ``jax.profiler.trace``
(``create_perfetto_trace=True``), reads the per-op events of the trace (XLA names each thunk
after its HLO instruction) and sorts each instruction of the compiled HLO into a kind:

- ``matrix products``: ``dot`` and ``convolution`` (a grouped one is a depthwise layer), and
  fusions around a product;
- ``depthwise``: kfor1's depthwise kernels (forward, kernel gradient, the fused expand +
  depthwise of inference) and grouped convolutions;
- ``BatchNorm sums``: kfor1's paired channel sums and XLA reductions (fusions of kind ``kInput``);
- ``stem patches``: the stem's im2col kernel;
- ``elementwise``: loop fusions and single elementwise ops;
- ``data movement``: copies, transposes, slices, pads, concatenations, broadcasts, gathers;
- ``other``: the rest (the while loops of micro-batching are counted by their bodies' ops).

Prints, per path, milliseconds per step and share by kind, the largest ops, and the FLOP-based
efficiency of the path (model GFLOP/s, as the suite counts them, against the jnp.dot peak).
Then (unless ``--no-torch``) PyTorch's same three paths, as the suite runs them, profiled by
``benchmarks/profiles/torch_ops.py`` into the same kinds, and one table of both side by side: a
ratio of images/s says who is faster, this says where.

    python -m benchmarks.profiles --resolution 128 --batch 32
    python -m benchmarks.profiles --tiny
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks.common import cell_parser, write_json
from benchmarks.profiles.torch_ops import profile_torch_path
from benchmarks.suite.bench import PATCH, Bench
from benchmarks.suite.sections import analytic_macs, matmul_peak
from kfor1.cpu import keep_freed_memory
from kfor1.layers import native

KINDS = ("matrix products", "depthwise", "BatchNorm sums", "stem patches", "elementwise",
         "data movement", "other")
MOVEMENT = {"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
            "concatenate", "broadcast", "gather", "scatter", "reshape", "bitcast", "reverse",
            "copy-start", "copy-done", "iota"}
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential",
               "log", "rsqrt", "sqrt", "select", "compare", "convert", "negate", "clamp", "abs",
               "tanh", "logistic", "power", "and", "or", "not", "xor"}
# %name = f32[...]{...} opcode(...), kind=kLoop, custom_call_target="..."
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")


COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
LAYOUT_ONLY = MOVEMENT | {"parameter", "tuple", "get-tuple-element", "constant"}


def _computations(hlo: str) -> dict[str, set[str]]:
    """Computation name -> the opcodes of its instructions."""
    bodies: dict[str, set[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            bodies[current] = set()
        elif line.strip() == "}":
            current = None
        elif current is not None:
            match = INSTRUCTION.match(line)
            if match:
                bodies[current].add(match.group(2))
    return bodies


def _fusion_kind(opcodes: set[str]) -> str:
    if opcodes & {"dot", "convolution"}:
        return "matrix products"
    if "reduce" in opcodes:
        return "BatchNorm sums"
    if opcodes <= LAYOUT_ONLY:
        return "data movement"
    return "elementwise"


def classify(hlo: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of the compiled HLO text."""
    bodies = _computations(hlo)
    kinds = {}
    for line in hlo.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            target = target.group(1) if target else ""
            kind = {native.TARGET: "depthwise", native.GRAD_TARGET: "depthwise",
                    native.EXPAND_TARGET: "depthwise", native.SUMS_TARGET: "BatchNorm sums",
                    native.IM2COL_TARGET: "stem patches"}.get(target, "other")
        elif opcode == "convolution":
            kind = "depthwise" if "feature_group_count" in line else "matrix products"
        elif opcode == "dot":
            kind = "matrix products"
        elif opcode == "fusion":
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            kind = _fusion_kind(bodies.get(calls.group(1), set()) if calls else set())
        elif opcode in ("reduce", "reduce-window"):
            kind = "BatchNorm sums"
        elif opcode in MOVEMENT:
            kind = "data movement"
        elif opcode in ELEMENTWISE:
            kind = "elementwise"
        else:
            kind = "other"
        kinds[name] = kind
    return kinds


def op_times(run: Any, update: Any, steps: int) -> dict[str, float]:
    """Microseconds per step by event name over ``steps`` traced executions."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                result = run()
                update(result)
            jax.block_until_ready(result)
        [path] = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            totals[event["name"]] += float(event["dur"]) / steps
    return totals


def profile_path(name: str, workload: Any, hlo: str, steps: int) -> dict[str, Any]:
    for _ in range(2):  # Warm (the workload is compiled already).
        workload.update(jax.block_until_ready(workload.run()))
    kinds = classify(hlo)
    totals = op_times(workload.run, workload.update, steps)
    by_kind: dict[str, float] = collections.defaultdict(float)
    ops = []
    for event, us in totals.items():
        kind = kinds.get(event) or kinds.get(event.split(":")[0])
        if kind is None:
            continue  # Not an op of this executable (runtime, Python, other threads).
        by_kind[kind] += us
        ops.append((us, event, kind))
    return {"path": name, "op_us_per_step": sum(by_kind.values()),
            "by_kind_us": {k: by_kind.get(k, 0.0) for k in KINDS},
            "top_ops": [{"op": e, "kind": k, "us": us} for us, e, k in sorted(ops)[::-1][:12]],
            "ops_seen": len(ops), "instructions": len(kinds)}


def side_by_side(kfor1: Sequence[dict[str, Any]], pytorch: Sequence[dict[str, Any]]) -> str:
    """One table: per path and kind, kfor1's op ms per step beside PyTorch's."""
    lines = ["\nkfor1 / PyTorch, op ms per step by kind (PyTorch: ATen self time, "
             "benchmarks/profiles/torch_ops.py)\n",
             "| path | " + " | ".join(KINDS) + " | all ops |",
             "|---|" + "---:|" * (len(KINDS) + 1)]
    for k, t in zip(kfor1, pytorch):
        cells = [f"{k['by_kind_us'][kind] / 1e3:.1f} / {t['by_kind_us'][kind] / 1e3:.1f}"
                 for kind in KINDS]
        lines.append(f"| {k['path']} | " + " | ".join(cells)
                     + f" | {k['op_us_per_step'] / 1e3:.1f} / {t['op_us_per_step'] / 1e3:.1f} |")
    for t in pytorch:
        lines.append(f"\ntorch {t['path']}: largest ops (of {t['ops_seen']})")
        lines += [f"  {op['us'] / 1e3:7.2f} ms  {op['kind']:<16} {op['op']}"
                  for op in t["top_ops"][:8]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cell_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="traced steps per path")
    parser.add_argument("--no-torch", action="store_true",
                        help="profile kfor1 only (by default PyTorch's same paths too)")
    parser.add_argument("--tiny", action="store_true", help="32 px, batch 2, 1 step")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.batch, args.steps = 32, 2, 1
    # What Bench reads (see benchmarks/suite/grid.py).
    args.classes, args.ks, args.precision, args.torch_device = 10, [1], "float32", "cpu"
    args.infer_steps = 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    bench = Bench(argparse.Namespace(**{**vars(args), "steps": 1}))
    macs = analytic_macs(bench.model, bench.variables, args.resolution)
    forward = 2 * sum(macs.values()) * args.batch
    flops = {"inference": forward,
             "patch step": 2 * forward - 2 * macs["stem"] * args.batch
             + 2 * macs["classifier"] * args.batch,
             "full step": 3 * forward - 2 * macs["stem"] * args.batch}
    paths = {"inference": bench.kfor1_infer("auto"), "patch step": bench.kfor1_train(PATCH, 1),
             "full step": bench.kfor1_train("full", 1)}
    torch_paths = {"inference": lambda: bench.torch_infer(True),
                   "patch step": lambda: bench.torch_train("patch"),
                   "full step": lambda: bench.torch_train("full")}
    peak = matmul_peak(bench, 256 if args.tiny else 2048, 1 if args.tiny else 5)
    peak_gflops = peak["jnp.dot"]["gflops"]
    results = []
    for name, workload in paths.items():
        hlo = workload.compiled.as_text()
        found = profile_path(name, workload, hlo, args.steps)
        found["model_gflops_per_s"] = flops[name] / (found["op_us_per_step"] * 1e-6) / 1e9
        found["fraction_of_peak"] = found["model_gflops_per_s"] / peak_gflops
        results.append(found)
    paths.clear()
    del workload
    bench.release()  # kfor1's executables and buffers go before PyTorch's are built.
    torch_results = [] if args.no_torch else [
        profile_torch_path(name, make(), args.steps, KINDS) for name, make in torch_paths.items()]
    print(f"\n{args.model}, {args.resolution} px, batch {args.batch}: op time per step by kind "
          f"(jax.profiler, {args.steps} steps); jnp.dot peak {peak_gflops:.0f} GFLOP/s\n")
    print("| path | op ms/step | " + " | ".join(KINDS) + " | model GFLOP/s (of peak) |")
    print("|---|---:|" + "---:|" * len(KINDS) + "---:|")
    for r in results:
        total = r["op_us_per_step"] or 1.0
        shares = " | ".join(f"{100 * r['by_kind_us'][k] / total:.0f}%" for k in KINDS)
        print(f"| {r['path']} | {r['op_us_per_step'] / 1e3:.1f} | {shares} | "
              f"{r['model_gflops_per_s']:.0f} ({100 * r['fraction_of_peak']:.0f}%) |")
    for r in results:
        print(f"\n{r['path']}: largest ops (of {r['ops_seen']} timed, {r['instructions']} "
              "instructions)")
        for op in r["top_ops"][:8]:
            print(f"  {op['us'] / 1e3:7.2f} ms  {op['kind']:<16} {op['op']}")
    if torch_results:
        print(side_by_side(results, torch_results))
    write_json(args.json, {"results": results, "torch_results": torch_results,
                           "matmul_peak": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
