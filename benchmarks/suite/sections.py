"""The suite's sections: each measures one claim in one cell and returns (results, markdown).

``SECTION_FUNCTIONS`` maps a section's name to its title and function; ``benchmarks/suite/grid.py``
runs them over the grid.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import kfor1
from benchmarks.suite.bench import (
    LEARNING_RATE,
    PATCH,
    WEIGHT_DECAY,
    Bench,
    Workload,
    measure,
    tree_bytes,
)
from kfor1.files.patchfile import META_FILE, WEIGHTS_FILE, export_patch

PRESETS = ("logits", "scale_bias", "depthwise", "bias", "scale_bias+logits",
           "depthwise+scale_bias+logits", "full")
SECTIONS = ("patch_step", "inference", "full_step", "k_tasks", "patch_files", "flops")
# Issue 15's targets. Ratios are kfor1 / torch images/s (medians), ``k_tasks`` images/s at K over
# K = 1, ``*_peak`` model GFLOP/s over the measured jnp.dot peak; ``compile_*`` are upper
# bounds in seconds for compiling the K = 1 and K = 8 training steps.
TARGETS = {
    "patch_step": 1.5,
    "full_step": 1.25,
    "inference": 2.0,
    "k_tasks": 0.95,
    "inference_peak": 0.70,
    "patch_step_peak": 0.50,
    "compile_k1_s": 5.0,
    "compile_k8_s": 10.0,
}

# ---------------------------------------------------------------------------------------------
# Sections.


def _measure(bench: Bench, workloads: list[Workload]) -> dict[str, Any]:
    a = bench.args
    return measure(workloads, a.warmup, a.repeats, a.settle, a.pause,
                   release=not getattr(a, "keep_heap", False))


def _row(result: dict[str, Any]) -> str:
    return f"{result['images_per_s']:.1f} | {result['images_per_s_best']:.1f}"


def _verdict(value: float, target: float) -> str:
    return f"{'met' if value >= target else 'MISSED'} (target >= {target})"


def section_patch_step(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    kf, tc = bench.kfor1_train(PATCH, 1), bench.torch_train("patch")
    timings = _measure(bench, [kf, tc])
    k, t = timings[kf.name], timings[tc.name]
    ratio, ratio_best = k["images_per_s"] / t["images_per_s"], (
        k["images_per_s_best"] / t["images_per_s_best"])
    table = [
        f"| {PATCH} step, {a.resolution} px, batch {a.batch} | img/s (median) | img/s (best) |",
        "|---|---:|---:|",
        f"| kfor1 `make_train_step` (K=1) | {_row(k)} |",
        f"| torch (channels_last, padding in conv, frozen requires_grad=False) | {_row(t)} |",
        f"| **kfor1 / torch** | **{ratio:.2f}x** | {ratio_best:.2f}x |",
    ]
    text = "\n".join(table) + f"\n\nkfor1 / torch: {_verdict(ratio, TARGETS['patch_step'])}"
    return {"timings": timings, "ratio": ratio, "ratio_best": ratio_best,
            "target": TARGETS["patch_step"], "met": ratio >= TARGETS["patch_step"]}, text


def section_inference(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    checks = bench.check_torch_matches()
    # The first row is kfor1's inference as its API runs it (micro-batched on CPU from
    # CPU_MIN_BATCH images); the whole-batch row only if that differs.
    workloads = [bench.kfor1_infer("auto"), bench.torch_infer(True), bench.kfor1_infer(None),
                 bench.kfor1_predict(), bench.torch_infer(False)]
    workloads = list({w.name: w for w in workloads}.values())
    timings = _measure(bench, workloads)
    k, t = timings[workloads[0].name], timings[workloads[1].name]
    ratio = k["images_per_s"] / t["images_per_s"]
    ratio_best = k["images_per_s_best"] / t["images_per_s_best"]
    table = [f"| inference, {a.resolution} px, batch {a.batch} | img/s (median) | img/s (best) |",
             "|---|---:|---:|"]
    table += [f"| {w.name} | {_row(timings[w.name])} |" for w in workloads]
    table.append(f"| **kfor1 (first row) / torch** | **{ratio:.2f}x** | {ratio_best:.2f}x |")
    text = (
        "\n".join(table) + f"\n\nkfor1 / torch: {_verdict(ratio, TARGETS['inference'])}"
        f"\nmax |logits - kfor1| (ImageNet head): torch exact "
        f"{checks['torch_exact_max_abs_diff']:.2e}, torch fast "
        f"{checks['torch_fast_max_abs_diff']:.2e} (logit std {checks['logit_std']:.2f})"
    )
    return {"timings": timings, "ratio": ratio, "ratio_best": ratio_best, "checks": checks,
            "target": TARGETS["inference"], "met": ratio >= TARGETS["inference"]}, text


def section_full_step(bench: Bench) -> tuple[dict[str, Any], str]:
    """Full fine-tuning, kfor1 against PyTorch; beside it the patch step of ``patch_step`` (when
    that section ran): all four in one section would hold four steps' working memory at once."""
    a = bench.args
    workloads = [bench.kfor1_train("full", 1), bench.torch_train("full")]
    timings = _measure(bench, workloads)
    kf, tf = (timings[w.name] for w in workloads)
    ratio = kf["images_per_s"] / tf["images_per_s"]
    table = [
        f"| training step, {a.resolution} px, batch {a.batch} | img/s (median) | img/s (best) |",
        "|---|---:|---:|",
        f"| kfor1 full (`full` patch, K=1) | {_row(kf)} |",
        f"| torch full (all requires_grad) | {_row(tf)} |",
        f"| **kfor1 full / torch full** | **{ratio:.2f}x** | "
        f"{kf['images_per_s_best'] / tf['images_per_s_best']:.2f}x |",
    ]
    out = {"timings": timings, "ratio": ratio, "target": TARGETS["full_step"],
           "met": ratio >= TARGETS["full_step"]}
    kp, tp = bench.timing(bench.train_name(PATCH, 1)), bench.timing(bench.torch_train_name("patch"))
    if kp is not None and tp is not None:
        out["patch_vs_full"] = kp["images_per_s"] / kf["images_per_s"]
        out["torch_patch_vs_full"] = tp["images_per_s"] / tf["images_per_s"]
        table += [f"| kfor1 patch (`patch_step`) / kfor1 full | {out['patch_vs_full']:.2f}x | |",
                  f"| torch patch / torch full | {out['torch_patch_vs_full']:.2f}x | |"]
    text = "\n".join(table) + (
        f"\n\nkfor1 full / torch full: {_verdict(ratio, TARGETS['full_step'])}")
    return out, text


def section_k_tasks(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    workloads = [bench.kfor1_train(PATCH, k) for k in a.ks]
    timings = _measure(bench, workloads)
    base = timings[workloads[0].name]
    single = sum(workloads[0].extra["state_bytes"].values())
    full_variables = tree_bytes(bench.variables)
    full_timing = bench.timing(bench.train_name("full", 1))
    if full_timing is not None:
        full_state = sum(full_timing["state_bytes"].values())
    else:  # Not measured by another section: build the state (uncompiled) to weigh it.
        labels = kfor1.partition(bench.variables, "full")
        opt = kfor1.patch_optimizer(optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                                    labels)
        state = bench.kfor1_state("full", 1, opt)
        full_state = tree_bytes((state.params, state.batch_stats, state.opt_state))
    rows, out = [], {}
    for k, w in zip(a.ks, workloads):
        t = timings[w.name]
        state = sum(w.extra["state_bytes"].values())
        rel = t["images_per_s"] / base["images_per_s"]
        rel_best = t["images_per_s_best"] / base["images_per_s_best"]
        out[k] = {
            "images_per_s": t["images_per_s"], "images_per_s_best": t["images_per_s_best"],
            "relative_to_k1": rel, "relative_to_k1_best": rel_best,
            "state_bytes": w.extra["state_bytes"], "state_total_bytes": state,
            "k_single_task_states_bytes": k * single, "k_full_models_bytes": k * full_variables,
            "k_full_finetune_states_bytes": k * full_state, "compile_s": w.compile_s,
        }
        rows.append(
            f"| {k} | {t['images_per_s']:.1f} | {rel:.2f} ({rel_best:.2f}) "
            f"| {state / 2**20:.1f} | {k * single / 2**20:.1f} ({k * single / state:.1f}x) "
            f"| {k * full_variables / 2**20:.1f} ({k * full_variables / state:.1f}x) "
            f"| {k * full_state / 2**20:.1f} ({k * full_state / state:.1f}x) "
            f"| {w.compile_s:.1f} |"
        )
    worst = min(v["relative_to_k1"] for v in out.values())
    table = [
        f"| K ({PATCH}, {a.batch} img/task, {a.resolution} px) | img/s | vs K=1 median (best) "
        "| K-task state MiB | K single-task states MiB | K full models MiB "
        "| K full fine-tuning states MiB | compile s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    text = (
        "\n".join(table)
        + "\n\nstate = params + batch_stats + AdamW state; full model = variables only; full "
        "fine-tuning state = variables + AdamW moments.\n"
        + f"worst images/s vs K=1: {_verdict(worst, TARGETS['k_tasks'])}"
    )
    return {"by_k": out, "ks": list(a.ks), "worst_relative": worst, "timings": timings,
            "target": TARGETS["k_tasks"], "met": worst >= TARGETS["k_tasks"],
            "full_variables_bytes": full_variables, "single_task_state_bytes": single}, text


def section_patch_files(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    full_bytes = len(flax.serialization.to_bytes(bench.variables))
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            state = bench.kfor1_state(preset, 1)
            directory = export_patch(state, 0, os.path.join(tmp, preset.replace("+", "_")), {
                "class_names": [f"class_{i}" for i in range(a.classes)],
                "preprocessing": bench.pretrained.preprocessing.to_dict(),
                "spec": preset, "base": {"model": a.model},
            })
            weights = os.path.getsize(os.path.join(directory, WEIGHTS_FILE))
            meta_bytes = os.path.getsize(os.path.join(directory, META_FILE))
            with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
                meta = json.load(f)
            out[preset] = {
                "weights_bytes": weights, "meta_bytes": meta_bytes,
                "patch_parameters": meta["patch_parameters"],
                "patch_statistics": meta["patch_statistics"],
                "fraction_of_full": (weights + meta_bytes) / full_bytes,
            }
            rows.append(
                f"| {preset} | {meta['patch_parameters']:,} | {meta['patch_statistics']:,} "
                f"| {weights / 1024:.1f} | {meta_bytes / 1024:.1f} "
                f"| {100 * (weights + meta_bytes) / full_bytes:.2f}% |"
            )
    table = [
        f"| preset ({a.model}, {a.classes} classes) | patch params | BN statistics "
        f"| {WEIGHTS_FILE} KiB | {META_FILE} KiB | of full checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        f"| full checkpoint (`flax.serialization.to_bytes(variables)`) "
        f"| {sum(np.size(x) for x in jax.tree.leaves(bench.variables['params'])):,} "
        f"| {sum(np.size(x) for x in jax.tree.leaves(bench.variables['batch_stats'])):,} "
        f"| {full_bytes / 1024:.1f} | | 100% |",
    ]
    return {"presets": out, "full_checkpoint_bytes": full_bytes}, "\n".join(table)


def analytic_macs(model: Any, variables: Any, resolution: int) -> dict[str, int]:
    """Multiply-accumulates per image of every convolution and the classifier, from the kernel
    shapes and the spatial size each layer outputs (TF SAME: ceil(size / stride)).

    A (kh, kw, cin, cout) kernel at an (h, w) output costs h*w*kh*kw*cin*cout; a depthwise
    (kh, kw, 1, C) one h*w*kh*kw*C: both are h*w*prod(kernel.shape).
    """
    params = variables["params"]
    macs = {"stem": 0, "expand 1x1": 0, "depthwise": 0, "project 1x1": 0, "top 1x1": 0,
            "classifier": 0}
    size = math.ceil(resolution / 2)
    macs["stem"] = size * size * int(np.prod(params["stem"]["conv"]["kernel"].shape))
    for i, spec in enumerate(model.blocks):
        block = params[f"blocks_{i}"]
        kernels = {name: int(np.prod(layer["conv"]["kernel"].shape))
                   for name, layer in block.items()}
        if "expand" in kernels:
            macs["expand 1x1"] += size * size * kernels["expand"]
        size = math.ceil(size / spec.stride)
        macs["depthwise"] += size * size * kernels["depthwise"]
        macs["project 1x1"] += size * size * kernels["project"]
    macs["top 1x1"] = size * size * int(np.prod(params["top"]["conv"]["kernel"].shape))
    macs["classifier"] = int(np.prod(params["head"]["logits"]["kernel"].shape))
    return macs


def matmul_peak(bench: Bench, n: int, repeats: int) -> dict[str, Any]:
    """n x n matmul GFLOP/s in the cell's precision, ``jnp.dot`` and ``torch.mm`` on their
    devices, alternated (median and best). About 20 GFLOP per repetition on a CPU, 20 TFLOP on
    a GPU, so that a repetition is well past dispatch overhead."""
    dtype = "bfloat16" if bench.bf16 else "float32"
    rng = np.random.default_rng(1)
    a_np, b_np = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
    a, b = (jnp.asarray(x, dtype) for x in (a_np, b_np))
    ta, tb = (torch.from_numpy(x).to(bench.device, getattr(torch, dtype)) for x in (a_np, b_np))
    dot = jax.jit(jnp.dot)
    budget = 2e10 if jax.default_backend() == "cpu" else 2e13
    steps = max(1, int(budget // (2 * n**3)))

    def mm() -> Any:
        return bench._torch_result(torch.mm(ta, tb))

    workloads = [Workload("jnp.dot", lambda: dot(a, b), lambda _: None, 1, steps),
                 Workload("torch.mm", mm, lambda _: None, 1, steps)]
    timings = measure(workloads, 2, repeats)
    flops = 2.0 * n**3
    return {name: {"gflops": flops / t["step_s_median"] / 1e9,
                   "gflops_best": flops / min(t["step_s"]) / 1e9, "n": n, "dtype": dtype}
            for name, t in timings.items()}


def section_flops(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    macs = analytic_macs(bench.model, bench.variables, a.resolution)
    forward = 2 * sum(macs.values()) * a.batch  # FLOPs = 2 x MACs.
    stem = 2 * macs["stem"] * a.batch
    head = 2 * macs["classifier"] * a.batch
    # Backward: every layer's input gradient (not the stem's: its input is the image), plus the
    # weight gradients of trained layers: the classifier only (patch), or every layer (full).
    model_flops = {"inference": forward, "patch step": 2 * forward - stem + head,
                   "full step": 3 * forward - stem}
    paths = {  # path: (kfor1's workload, PyTorch's), as (builder, name).
        "inference": ((bench.kfor1_infer, ("auto",), bench.infer_name("auto")),
                      (bench.torch_infer, (True,), bench.torch_infer_name(True))),
        "patch step": ((bench.kfor1_train, (PATCH, 1), bench.train_name(PATCH, 1)),
                       (bench.torch_train, ("patch",), bench.torch_train_name("patch"))),
        "full step": ((bench.kfor1_train, ("full", 1), bench.train_name("full", 1)),
                      (bench.torch_train, ("full",), bench.torch_train_name("full"))),
    }
    # Step times: every repetition of the sections that measured a path (pooled, median);
    # paths that no section measured are built and measured here.
    step_s: dict[str, list[float]] = {}
    for section in bench.results.values():
        for name, timing in section.get("timings", {}).items():
            step_s.setdefault(name, []).extend(timing["step_s"])  # Seconds per step.
    missing = [build(*key) for pair in paths.values() for build, key, name in pair
               if name not in step_s]
    fresh = _measure(bench, missing) if missing else {}
    for name, timing in fresh.items():
        step_s[name] = list(timing["step_s"])
    # XLA's cost analysis counts a loop body once: take the micro-batched inference's counts
    # from the same computation over the whole batch.
    whole = bench.infer_name(None)
    costs = {name: (bench.timing(name) or fresh.get(name) or {}).get("cost")
             for name in (*step_s, whole)}
    if costs[paths["inference"][0][2]] is not None and costs.get(whole) is not None:
        costs[paths["inference"][0][2]] = costs[whole]
    bench.release()
    peak = matmul_peak(bench, a.matmul_size, a.repeats)
    peak_gflops = peak["jnp.dot"]["gflops"]
    rows, out = [], {}
    for path, ((_, _, kf), (_, _, tc)) in paths.items():
        xla = costs.get(kf) or {"flops": float("nan"), "bytes_accessed": float("nan")}
        for name, flops_xla in ((kf, xla["flops"]), (tc, None)):
            t = statistics.median(step_s[name])
            model_gflops = model_flops[path] / t / 1e9
            entry = {"step_s": t, "repetitions": len(step_s[name]),
                     "model_flops": model_flops[path], "model_gflops_per_s": model_gflops,
                     "fraction_of_jnp_dot_peak": model_gflops / peak_gflops}
            xla_cell = intensity = "-"
            if flops_xla is not None:
                entry.update(xla_flops=flops_xla, xla_bytes_accessed=xla["bytes_accessed"],
                             xla_gflops_per_s=flops_xla / t / 1e9)
                xla_cell = f"{flops_xla / 1e9:.2f} / {flops_xla / t / 1e9:.1f}"
                intensity = f"{flops_xla / xla['bytes_accessed']:.1f}"
            out.setdefault(path, {})[name] = entry
            rows.append(
                f"| {path} | {name} | {t * 1e3:.0f} | {model_flops[path] / 1e9:.2f} "
                f"| {model_gflops:.1f} | {100 * model_gflops / peak_gflops:.1f}% | {xla_cell} "
                f"| {intensity} |"
            )
    breakdown = " | ".join(f"{name} {2 * m * a.batch / 1e9:.3f}" for name, m in macs.items())
    table = [
        f"| path ({a.resolution} px, batch {a.batch}) | implementation | step ms (median) "
        "| model GFLOP | model GFLOP/s | of jnp.dot peak | XLA GFLOP / GFLOP/s "
        "| XLA flop/byte |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    text = (
        "\n".join(table)
        + f"\n\nforward model GFLOP per batch by layer: {breakdown}"
        + f"\nmatmul peak ({a.matmul_size}x{a.matmul_size} {peak['jnp.dot']['dtype']}): jnp.dot "
        f"{peak['jnp.dot']['gflops']:.1f} GFLOP/s (best {peak['jnp.dot']['gflops_best']:.1f}), "
        f"torch.mm {peak['torch.mm']['gflops']:.1f} (best {peak['torch.mm']['gflops_best']:.1f})"
        + "\nmodel GFLOP: 2 x MACs of the convolutions and classifier (forward; training adds "
        "input gradients of all but the stem, and weight gradients of trained layers); XLA "
        "GFLOP: `compiled.cost_analysis()['flops']`, which also counts elementwise work."
    )
    kfor1_share = {path: out[path][kf[2]]["fraction_of_jnp_dot_peak"]
                   for path, (kf, _) in paths.items()}
    met = {"inference_peak": kfor1_share["inference"] >= TARGETS["inference_peak"],
           "patch_step_peak": kfor1_share["patch step"] >= TARGETS["patch_step_peak"]}
    text += (f"\nkfor1 inference at {100 * kfor1_share['inference']:.1f}% of the peak: "
             f"{_verdict(kfor1_share['inference'], TARGETS['inference_peak'])}; patch step at "
             f"{100 * kfor1_share['patch step']:.1f}%: "
             f"{_verdict(kfor1_share['patch step'], TARGETS['patch_step_peak'])}")
    return {"paths": out, "analytic_macs_per_image": macs, "model_flops": model_flops,
            "matmul_peak": peak, "kfor1_fraction_of_peak": kfor1_share, "met": met}, text


SECTION_FUNCTIONS = {
    "patch_step": ("1. Patch training step", section_patch_step),
    "inference": ("2. Inference", section_inference),
    "full_step": ("3. Full fine-tuning step", section_full_step),
    "k_tasks": ("4. K-task step", section_k_tasks),
    "patch_files": ("5. Patch file size", section_patch_files),
    "flops": ("6. Distance from the limit", section_flops),
}


