"""Checks that kfor1 runs as designed on an accelerator (``benchmarks/device_check.sh`` runs it,
then the suite against PyTorch CUDA).

1. **Backend**: JAX runs on a GPU or TPU (``--allow-cpu`` runs the checks on the CPU, for the
   tests, where the CPU-only paths are expected *on*).
2. **CPU-only paths off**: ``conv_impl="auto"`` resolves to XLA's convolutions, micro-batching and
   task chunks are off, and no compiled step (training, evaluation, prediction) calls one of
   kfor1's CPU kernels (``kfor1.layers.native``'s XLA FFI targets, which exist for the CPU only:
   a step calling one would fail to compile on a GPU, or silently move data to the host).
3. **A K-task step equals K single-task steps**: K tasks (different images, labels and class
   counts) trained one step in one compiled step, against each task trained alone from the same
   start (SGD, so that parameters move by the gradient); every task's patch and BatchNorm
   statistics (the relative error of their change), losses (relative) and predicted
   probabilities agree to ``--tol`` (1e-5) at
   float32 precision (``jax.default_matmul_precision("float32")``: at JAX's default on a GPU,
   TF32 products, the two compute with different rounding, reported beside it), for the
   ``scale_bias+logits`` and ``depthwise+scale_bias+logits`` patches; and the K-task prediction
   equals each task's model. One step, because that compares the gradients themselves: over
   more steps float32 rounding is amplified by the data's conditioning (on the CPU, two SGD steps
   on random images at 64 px left 1.2e-4 between the K = 3 step and the single-task one, the
   same for three *identical* tasks, so no task mixing), and at 32 px, where the last feature
   maps are 1 x 1 and BatchNorm normalises 8 values, one step left 4e-5.

Prints one line per check and ``device check: passed`` (exit 0) or the failures (exit 1);
``--json`` writes the numbers.

    python -m benchmarks.device.check --json device_check.json
    python -m benchmarks.device.check --allow-cpu --resolution 64   # on a CPU, for the tests
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfor1
from benchmarks.common import write_json
from kfor1.layers import native
from kfor1.layers.padding import resolve_impl
from kfor1.microbatch import resolve_micro_batch, resolve_task_chunk
from kfor1.tree import flatten

STEPS = 1  # See the docstring (3.): one step compares the gradients.
SPECS = ("scale_bias+logits", "depthwise+scale_bias+logits")
CLASSES = (10, 5, 7)  # Three tasks; the K-task head is padded to 10 classes and masked.
KERNEL_TARGETS = (native.TARGET, native.GRAD_TARGET, native.SUMS_TARGET, native.IM2COL_TARGET,
                  native.EXPAND_TARGET)


def cpu_paths(on_cpu: bool) -> dict[str, Any]:
    """What ``"auto"`` resolves to here; on an accelerator every CPU-only path must be off."""
    found = {
        "conv_impl": resolve_impl("auto"),
        "micro_batch_of_128": resolve_micro_batch("auto", 128),
        "task_chunk_of_8x32": resolve_task_chunk("auto", 8, 32),
    }
    # On the CPU, task chunks are for a single device only (see resolve_task_chunk).
    chunk = 2 if jax.device_count() == 1 else None
    expected = ({"conv_impl": "fast_cpu", "micro_batch_of_128": 16, "task_chunk_of_8x32": chunk}
                if on_cpu else
                {"conv_impl": "xla", "micro_batch_of_128": None, "task_chunk_of_8x32": None})
    return {"found": found, "expected": expected, "ok": found == expected}


def kernel_calls(hlo: str) -> list[str]:
    """kfor1's CPU kernels named in a compiled step's HLO text."""
    return sorted({t for t in KERNEL_TARGETS if t in hlo})


def setup(model_name: str, resolution: int, batch: int, spec: str) -> tuple[Any, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "head re-initialised" for 10 classes.
        pretrained = kfor1.load_pretrained(model_name, num_classes=max(CLASSES))
    model = pretrained.model.clone(dropout_rate=0.0)
    labels = kfor1.partition(pretrained.variables, spec)
    # SGD: an update proportional to the gradient. Adam's first steps are about lr * sign(g),
    # so a gradient near 0 computed with another rounding moves a parameter by up to 2 * lr
    # (2e-3 on the CPU for 1e-3): a check of Adam's conditioning, not of the step.
    optimizer = kfor1.patch_optimizer(optax.sgd(0.1), labels)
    rng = np.random.default_rng(0)
    k = len(CLASSES)
    images = rng.normal(size=(2, k, batch, resolution, resolution, 3)).astype(np.float32)
    targets = np.stack([rng.integers(0, n, (2, batch)) for n in CLASSES], axis=1)
    return pretrained.variables, model, labels, optimizer, images, targets


def equivalence(model_name: str, resolution: int, batch: int, spec: str,
                precision: str | None) -> dict[str, Any]:
    """One step of K tasks in one compiled step against each task alone: relative errors."""
    variables, model, labels, optimizer, images, targets = setup(
        model_name, resolution, batch, spec)
    tasks = [kfor1.Task(f"task{i}", n) for i, n in enumerate(CLASSES)]
    key = jax.random.key(0)
    with jax.default_matmul_precision(precision):
        step = kfor1.make_train_step(model, optimizer)
        start = kfor1.init_multitask(variables, labels, tasks, optimizer, spec=spec)
        initial = [{p: np.asarray(v) for p, v in flatten(kfor1.task_variables(start, i)).items()}
                   for i in range(len(tasks))]  # Copies: the step donates its input state.
        joint = start
        joint_losses = []
        for s in range(STEPS):
            joint, metrics = step(joint, {"images": jnp.asarray(images[s]),
                                          "labels": jnp.asarray(targets[s])}, key)
            joint_losses.append(np.asarray(metrics["loss"]))
        predict = kfor1.make_predict_fn(model)
        joint_probs = np.asarray(predict(joint, jnp.asarray(images[0])))
        # Relative errors of what the steps computed: the largest difference of a kind (patch
        # parameters, BatchNorm statistics) over the largest change of that kind in the two
        # steps (the gradients, for SGD; per leaf would divide rounding noise by nothing where a
        # gradient is ~0 in exact arithmetic, as a projection's BN bias before the next BN); of
        # the losses; and of the probabilities (absolute).
        diffs = {"params": 0.0, "batch_stats": 0.0, "loss": 0.0, "predict": 0.0}
        change = {"params": 0.0, "batch_stats": 0.0}
        for i, task in enumerate(tasks):
            # Alone, the task's model has its own class count (the K-task one has the largest).
            own = model.clone(num_classes=task.num_classes)
            own_step = kfor1.make_train_step(own, optimizer)
            own_predict = kfor1.make_predict_fn(own)
            alone = kfor1.init_multitask(variables, labels, [task], optimizer, spec=spec)
            losses = []
            for s in range(STEPS):
                alone, metrics = own_step(alone, {"images": jnp.asarray(images[s, i:i + 1]),
                                                  "labels": jnp.asarray(targets[s, i:i + 1])}, key)
                losses.append(np.asarray(metrics["loss"])[0])
            probs = np.asarray(own_predict(alone, jnp.asarray(images[0, i:i + 1])))[0]
            mine, theirs = (flatten(kfor1.task_variables(st, j))
                            for st, j in ((joint, i), (alone, 0)))
            for path, value in mine.items():
                kind = "batch_stats" if path.startswith("batch_stats") else "params"
                moved = np.max(np.abs(np.asarray(theirs[path]) - initial[i][path]))
                change[kind] = max(change[kind], float(moved))
                diff = np.max(np.abs(np.asarray(value) - np.asarray(theirs[path])))
                diffs[kind] = max(diffs[kind], float(diff))
            diffs["loss"] = max(diffs["loss"], float(np.max(np.abs(
                np.array([loss[i] for loss in joint_losses]) / np.array(losses) - 1))))
            diffs["predict"] = max(diffs["predict"], float(np.max(np.abs(
                joint_probs[i, :, :task.num_classes] - probs[:, :task.num_classes]))))
        for kind, moved in change.items():
            diffs[kind] /= moved or 1.0
        hlo = "\n".join(f.lower(*a).compile().as_text() for f, a in (
            (step, (joint, {"images": jnp.asarray(images[0]),
                            "labels": jnp.asarray(targets[0])}, key)),
            (predict, (joint, jnp.asarray(images[0]))),
            (kfor1.make_eval_step(model), (joint, {"images": jnp.asarray(images[0]),
                                                   "labels": jnp.asarray(targets[0])})),
        ))
    return {"errors": diffs, "kernel_calls": kernel_calls(hlo)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="images per task")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--specs", default=",".join(SPECS), help="patches to check")
    parser.add_argument("--precisions", default="float32,default",
                        help="matmul precisions: float32 (checked against --atol), default "
                        "(reported)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU (the tests): CPU-only paths are then expected on")
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backend = jax.default_backend()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {backend}: {device.device_kind} x {jax.device_count()}",
          flush=True)
    if backend == "cpu" and not args.allow_cpu:
        print("error: JAX runs on the CPU here; this check is for a GPU or TPU (pass "
              "--allow-cpu to run it on the CPU anyway)", file=sys.stderr)
        return 2
    failures = []
    results: dict[str, Any] = {"backend": backend, "device_kind": device.device_kind,
                               "jax_version": jax.__version__, "tol": args.tol}
    paths = cpu_paths(backend == "cpu")
    results["cpu_paths"] = paths
    print(f"auto paths: {paths['found']} (expected {paths['expected']}): "
          f"{'ok' if paths['ok'] else 'FAILED'}", flush=True)
    if not paths["ok"]:
        failures.append("auto paths")
    precisions = [None if p == "default" else p for p in args.precisions.split(",")]
    for spec in args.specs.split(","):
        for precision in precisions:
            start = time.perf_counter()
            found = equivalence(args.model, args.resolution, args.batch, spec, precision)
            label = f"{spec} at {precision or 'default'} precision"
            results[label] = found
            d = found["errors"]
            ok = precision is None or max(d.values()) <= args.tol
            calls_ok = bool(found["kernel_calls"]) == (backend == "cpu")
            print(f"K={len(CLASSES)} step vs {len(CLASSES)} single-task steps, {label}: max "
                  f"relative error params {d['params']:.2e}, batch_stats "
                  f"{d['batch_stats']:.2e}, loss {d['loss']:.2e}, predict (absolute) "
                  f"{d['predict']:.2e}"
                  + ("" if precision is None else f" ({'ok' if ok else 'FAILED'}: <= "
                     f"{args.tol:g})")
                  + f"; kfor1 CPU kernels in its compiled steps: {found['kernel_calls'] or 'none'}"
                  f" ({'ok' if calls_ok else 'FAILED'}); {time.perf_counter() - start:.0f} s",
                  flush=True)
            if not ok:
                failures.append(f"K-task equivalence, {label}")
            if not calls_ok:
                failures.append(f"CPU kernels, {label}")
    results["failures"] = failures
    write_json(args.json, results)
    print("device check: " + ("passed" if not failures else f"FAILED: {failures}"), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
