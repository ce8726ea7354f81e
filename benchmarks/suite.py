"""Benchmark suite: kfor1 against PyTorch on EfficientNet-Lite0 or MobileNetV2 1.0 (the paper's
base, ``--model mobilenet_v2``), and kfor1 against itself.

Six sections, all measured in one process (``--only`` picks some):

1. ``patch_step``: a ``scale_bias+logits`` training step (frozen shared network, BatchNorm in
   training mode, AdamW), kfor1 (``make_train_step``, K = 1) against PyTorch at its fastest;
2. ``inference``: eval-mode forward pass, jitted ``model.apply`` in micro-batches (as kfor1's
   inference functions run it on CPU) against ``torch.inference_mode``;
3. ``full_step``: full fine-tuning (every parameter trained), and the patch step against it;
4. ``k_tasks``: one step that trains K patches, images/s relative to K = 1, and the memory of the
   K-task state against K single-task states and K full models;
5. ``patch_files``: the size of an exported patch for each preset, against the full checkpoint;
6. ``flops``: FLOPs per step (XLA's cost analysis, and counted from the parameter shapes),
   achieved GFLOP/s per path, against a float32 matmul peak measured on the same machine.

PyTorch runs the same network (``benchmarks/torch_lite.py`` or ``torch_mobilenet.py``, the real
packaged weights) the fastest way eager PyTorch offers on CPU: channels_last tensors, padding
inside ``nn.Conv2d`` (symmetric ``k // 2``: for Lite not TensorFlow's SAME at stride 2, so the
outputs shift by a pixel, but the FLOPs are the same; for MobileNetV2 torchvision's own, exact
definition), ``requires_grad=False`` on frozen parameters, fused AdamW, all cores.

Every measurement runs untimed warm-up steps, then timed repetitions, each one untimed "settle"
step (the first step after switching workloads is slower) and timed steps ending in
``jax.block_until_ready``; tables give the median repetition and the fastest. Repetitions
alternate between the workloads compared in a section (kfor1 and PyTorch), so load from other
processes slows both. kfor1 functions are compiled ahead of time (``jit(...).lower(...)
.compile()``, the executable a first call would build), which gives XLA's cost analysis and keeps
compilation out of the timing.

Run from the repository root (results and how to read them: ``benchmarks/README.md``)::

    python -m benchmarks.suite --resolution 128 --batch 32 --json suite.json
    python -m benchmarks.suite --only patch_step,inference --ks 1,2,4
    python -m benchmarks.suite --model mobilenet_v2 --resolution 224 --batch 32
    python -m benchmarks.suite --tiny   # 32 px, batch 2, 1 step: only checks that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python benchmarks/suite.py``, or loaded from a file path.
    sys.path.insert(0, str(ROOT))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

import kfor1  # noqa: E402
from benchmarks import torch_lite, torch_mobilenet  # noqa: E402
from benchmarks.conv_impl import time_steps, warm_up  # noqa: E402
from kfor1.cpu import keep_freed_memory  # noqa: E402
from kfor1.microbatch import MicroBatch, map_micro_batches, resolve_micro_batch  # noqa: E402
from kfor1.models import packaged_weights_path  # noqa: E402
from kfor1.patchfile import META_FILE, WEIGHTS_FILE, export_patch  # noqa: E402

PATCH = "scale_bias+logits"
PRESETS = ("logits", "scale_bias", "depthwise", "bias", "scale_bias+logits",
           "depthwise+scale_bias+logits", "full")
SECTIONS = ("patch_step", "inference", "full_step", "k_tasks", "patch_files", "flops")
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
TARGETS = {
    "patch_step": 1.2,  # kfor1 / torch images/s
    "inference": 1.5,
    "full_step": 1.0,
    "patch_vs_full": 2.0,  # kfor1 patch step / kfor1 full step
    "k_tasks": 0.95,  # images/s at K / images/s at K=1
}




@dataclasses.dataclass(frozen=True)
class TorchReference:
    """The PyTorch network a model is compared with: ``load(path, num_classes, fast,
    dropout_rate)``, its classifier ``nn.Linear``, its ``scale_bias+logits`` parameters, and
    whether its fast form (padding inside the convolutions) differs from the exact one."""

    load: Callable[..., Any]
    classifier: Callable[[Any], Any]
    patch_parameters: Callable[[Any], list]
    fast_differs: bool


def _lite(path: str, num_classes: int = 1000, fast: bool = False,
          dropout_rate: float | None = None) -> Any:
    return torch_lite.load_lite(path, num_classes=num_classes, fast=fast,
                                dropout_rate=dropout_rate)


def _mobilenet(path: str, num_classes: int = 1000, fast: bool = False,
               dropout_rate: float | None = None) -> Any:
    # torchvision pads inside nn.Conv2d: its fast form is its exact one.
    return torch_mobilenet.load_mobilenet_v2(path, num_classes=num_classes,
                                             dropout_rate=dropout_rate)


# The models the suite runs (``--model``), each with its pip-packaged ImageNet weights.
MODELS = {
    "efficientnet_lite0": TorchReference(_lite, lambda m: m._fc,
                                         torch_lite.bn_and_classifier_parameters, True),
    "mobilenet_v2": TorchReference(_mobilenet, lambda m: m.classifier[1],
                                   torch_mobilenet.bn_and_classifier_parameters, False),
}


# ---------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Workload:
    """Something to time: ``run()`` returns its result (device arrays or torch tensors), and
    ``update(result)`` threads state into the next step; ``images`` per step."""

    name: str
    run: Callable[[], Any]
    update: Callable[[Any], None]
    images: int
    steps: int
    compile_s: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def measure(
    workloads: Sequence[Workload], warmup: int, repeats: int, settle: int = 1,
    pause: float = 0.0,
) -> dict[str, Any]:
    """Warms each workload up, then times ``repeats`` repetitions, alternating between them.

    Each repetition starts with ``pause`` seconds of idle and ``settle`` untimed steps: right
    after another workload its worker threads still spin for a while (PyTorch's OpenMP threads
    beside XLA's: kfor1's inference ran at 772 img/s without a pause, 976 with 0.5 s), and the
    first step after switching is slower (the allocator and caches were shaped by the other
    one; a K=1 step after a K=8 step takes up to twice as long). A training loop sees neither.
    Images/s are from the median repetition; ``images_per_s_best`` from the fastest (contention
    only adds time, so it bounds the quiet-machine rate).
    """
    first = {w.name: warm_up(w.run, w.update, warmup) for w in workloads}
    step_s: dict[str, list[float]] = {w.name: [] for w in workloads}
    for _ in range(repeats):
        for w in workloads:
            time.sleep(pause)
            for _ in range(settle):
                w.update(jax.block_until_ready(w.run()))
            step_s[w.name].append(time_steps(w.run, w.update, w.steps))
    out = {}
    for w in workloads:
        median, best = statistics.median(step_s[w.name]), min(step_s[w.name])
        out[w.name] = {
            "images_per_s": w.images / median, "images_per_s_best": w.images / best,
            "step_s_median": median, "step_s": step_s[w.name], "steps_per_repeat": w.steps,
            "images_per_step": w.images, "first_call_s": first[w.name],
            "compile_s": w.compile_s, **w.extra,
        }
    return out


def tree_bytes(tree: Any) -> int:
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled executable: flops and bytes accessed."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device program.
        analysis = analysis[0]
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


# ---------------------------------------------------------------------------------------------
# The workloads.


def _cached(build: Callable[..., Workload]) -> Callable[..., Workload]:
    """Builds each workload once (per method and arguments): sections share them, compiled."""

    @functools.wraps(build)
    def wrapper(self: Bench, *key: Any) -> Workload:
        if (build.__name__, *key) not in self.cache:
            self.cache[(build.__name__, *key)] = build(self, *key)
        return self.cache[(build.__name__, *key)]

    return wrapper


class Bench:
    """The pretrained model, data and every workload, built once and shared between sections."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.reference = MODELS[args.model]
        # --tiny only checks the code: skip LLVM optimisation, which is most of the compile time.
        self.compiler_options = {"xla_backend_optimization_level": 0} if args.tiny else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "head re-initialised": a 10-class task.
            self.pretrained = kfor1.load_pretrained(args.model, num_classes=args.classes)
        self.model = self.pretrained.model.clone(dropout_rate=0.0)
        self.variables = self.pretrained.variables
        self.weights_path = packaged_weights_path(args.model)
        k = max(args.ks)
        rng = np.random.default_rng(0)
        shape = (k, args.batch, args.resolution, args.resolution, 3)
        self.images = rng.normal(size=shape).astype(np.float32)
        self.labels = rng.integers(0, args.classes, (k, args.batch))
        # PyTorch's input: the first task's images, NCHW shape in channels_last memory.
        self.torch_images = torch.from_numpy(self.images[0]).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        self.torch_labels = torch.from_numpy(self.labels[0]).long()
        self.cache: dict[Any, Workload] = {}
        self.results: dict[str, Any] = {}

    def _compile(self, jitted: Any, *example: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        compiled = jitted.lower(*example).compile(self.compiler_options)
        return compiled, time.perf_counter() - start

    # kfor1 ------------------------------------------------------------------------------------

    def kfor1_state(self, spec: str, k: int, optimizer: Any = None) -> Any:
        labels = kfor1.partition(self.variables, spec)
        tasks = [kfor1.Task(f"task{i}", self.args.classes) for i in range(k)]
        return kfor1.init_multitask(self.variables, labels, tasks, optimizer)

    @_cached
    def kfor1_train(self, spec: str, k: int) -> Workload:
        """``kfor1.make_train_step`` on a K-task ``spec`` state, AdamW on the patch."""
        labels = kfor1.partition(self.variables, spec)
        optimizer = kfor1.patch_optimizer(
            optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), labels)
        state = self.kfor1_state(spec, k, optimizer)
        state_bytes = {
            "params": tree_bytes(state.params), "batch_stats": tree_bytes(state.batch_stats),
            "opt_state": tree_bytes(state.opt_state),
        }
        step = kfor1.make_train_step(self.model, optimizer)
        batch = {"images": jnp.asarray(self.images[:k]), "labels": jnp.asarray(self.labels[:k])}
        key = jax.random.key(0)
        compiled, compile_s = self._compile(step, state, batch, key)
        holder = {"state": state}

        def update(result: Any) -> None:
            holder["state"] = result[0]  # The step donates its input state.

        return Workload(
            f"kfor1 {spec} K={k}", lambda: compiled(holder["state"], batch, key), update,
            k * self.args.batch, self.args.steps, compile_s,
            {"state_bytes": state_bytes, "cost": cost(compiled)},
        )

    @_cached
    def kfor1_infer(self, micro_batch: MicroBatch = None) -> Workload:
        """Eval-mode ``jax.jit(model.apply)`` (BatchNorm on running statistics, variables on the
        device), over the whole batch or, as ``Pretrained.logits``, ``make_predict_fn`` and
        ``make_eval_step`` do, in chunks of ``micro_batch`` images (``kfor1.microbatch``)."""
        images = jnp.asarray(self.images[0])
        variables = jax.device_put(self.variables)
        size = resolve_micro_batch(micro_batch, images.shape[0])

        def apply(variables: Any, images: jax.Array) -> jax.Array:
            return map_micro_batches(functools.partial(self.model.apply, variables), images, size)

        compiled, compile_s = self._compile(jax.jit(apply), variables, images)
        name = "kfor1 jit(model.apply)" + (f" in micro-batches of {size}" if size else "")
        return Workload(name, lambda: compiled(variables, images), lambda _: None,
                        self.args.batch, self.args.infer_steps, compile_s,
                        {"cost": cost(compiled), "micro_batch": size})

    @_cached
    def kfor1_predict(self) -> Workload:
        """``kfor1.make_predict_fn`` on a K = 1 ``scale_bias+logits`` state (adds a softmax)."""
        state = self.kfor1_state(PATCH, 1)
        images = jnp.asarray(self.images[:1])
        compiled, compile_s = self._compile(kfor1.make_predict_fn(self.model), state, images)
        return Workload("kfor1 make_predict_fn K=1", lambda: compiled(state, images),
                        lambda _: None, self.args.batch, self.args.infer_steps, compile_s,
                        {"cost": cost(compiled)})

    # PyTorch ----------------------------------------------------------------------------------

    def torch_model(self, fast: bool = True) -> torch.nn.Module:
        """The packaged weights with kfor1's 10-class head, in channels_last memory."""
        model = self.reference.load(self.weights_path, num_classes=self.args.classes, fast=fast,
                                    dropout_rate=0.0)
        head = self.variables["params"]["head"]["logits"]
        classifier = self.reference.classifier(model)
        with torch.no_grad():
            classifier.weight.copy_(torch.from_numpy(np.array(head["kernel"]).T.copy()))
            classifier.bias.copy_(torch.from_numpy(np.array(head["bias"])))
        return model.to(memory_format=torch.channels_last)

    @_cached
    def torch_train(self, trainable: str) -> Workload:
        """A PyTorch step: ``patch`` trains BN weight/bias and the classifier, ``full`` all."""
        model = self.torch_model().train()
        if trainable == "patch":
            for p in model.parameters():
                p.requires_grad_(False)
            params = self.reference.patch_parameters(model)
            for p in params:
                p.requires_grad_(True)
        else:
            params = list(model.parameters())
        try:
            optimizer = torch.optim.AdamW(params, LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                          fused=True)
        except (RuntimeError, TypeError):  # No fused CPU AdamW in this torch.
            optimizer = torch.optim.AdamW(params, LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        x, y = self.torch_images, self.torch_labels

        def run() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return Workload(f"torch {trainable}", run, lambda _: None, self.args.batch,
                        self.args.steps, None,
                        {"trainable_parameters": sum(p.numel() for p in params)})

    @_cached
    def torch_infer(self, fast: bool) -> Workload:
        model = self.torch_model(fast).eval()
        x = self.torch_images

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        if not self.reference.fast_differs:
            name = "torch (padding in conv, exact)"
        else:
            name = "torch (padding in conv)" if fast else "torch exact (TF-SAME via F.pad)"
        return Workload(name, run, lambda _: None, self.args.batch, self.args.infer_steps)

    def check_torch_matches(self, n: int = 4) -> dict[str, float]:
        """Max |logits difference| of PyTorch against kfor1 with the real ImageNet weights and
        head (1000 classes), eval mode, on ``n`` of the benchmark's images: the exact (TF-SAME)
        model must reproduce kfor1; the fast one is off by its symmetric padding."""
        if "checks" not in self.results:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imagenet = kfor1.load_pretrained(self.args.model)
            images = self.images[0, :n]
            apply = jax.jit(imagenet.model.apply)
            expected = np.asarray(
                apply.lower(imagenet.variables, images).compile(self.compiler_options)(
                    imagenet.variables, images))
            checks = {"images": int(images.shape[0]), "logit_std": float(np.std(expected))}
            x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last)
            for fast, name in ((False, "torch_exact"), (True, "torch_fast")):
                model = self.reference.load(self.weights_path, fast=fast).eval()
                model = model.to(memory_format=torch.channels_last)
                with torch.inference_mode():
                    logits = model(x).numpy()
                checks[f"{name}_max_abs_diff"] = float(np.max(np.abs(logits - expected)))
            self.results["checks"] = checks
        return self.results["checks"]


# ---------------------------------------------------------------------------------------------
# Sections.


def _row(result: dict[str, Any]) -> str:
    return f"{result['images_per_s']:.1f} | {result['images_per_s_best']:.1f}"


def _verdict(value: float, target: float) -> str:
    return f"{'met' if value >= target else 'MISSED'} (target >= {target})"


def section_patch_step(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    kf, tc = bench.kfor1_train(PATCH, 1), bench.torch_train("patch")
    timings = measure([kf, tc], a.warmup, a.repeats, a.settle, a.pause)
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
    timings = measure(workloads, a.warmup, a.repeats, a.settle, a.pause)
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
    a = bench.args
    workloads = [bench.kfor1_train("full", 1), bench.torch_train("full"),
                 bench.kfor1_train(PATCH, 1), bench.torch_train("patch")]
    timings = measure(workloads, a.warmup, a.repeats, a.settle, a.pause)
    kf, tf, kp, tp = (timings[w.name] for w in workloads)
    ratio = kf["images_per_s"] / tf["images_per_s"]
    patch_vs_full = kp["images_per_s"] / kf["images_per_s"]
    torch_patch_vs_full = tp["images_per_s"] / tf["images_per_s"]
    table = [
        f"| training step, {a.resolution} px, batch {a.batch} | img/s (median) | img/s (best) |",
        "|---|---:|---:|",
        f"| kfor1 full (`full` patch, K=1) | {_row(kf)} |",
        f"| torch full (all requires_grad) | {_row(tf)} |",
        f"| kfor1 {PATCH} | {_row(kp)} |",
        f"| torch {PATCH} | {_row(tp)} |",
        f"| **kfor1 full / torch full** | **{ratio:.2f}x** | "
        f"{kf['images_per_s_best'] / tf['images_per_s_best']:.2f}x |",
        f"| **kfor1 patch / kfor1 full** | **{patch_vs_full:.2f}x** | "
        f"{kp['images_per_s_best'] / kf['images_per_s_best']:.2f}x |",
        f"| torch patch / torch full | {torch_patch_vs_full:.2f}x | "
        f"{tp['images_per_s_best'] / tf['images_per_s_best']:.2f}x |",
    ]
    text = (
        "\n".join(table) + f"\n\nkfor1 full / torch full: {_verdict(ratio, TARGETS['full_step'])}"
        f"\nkfor1 patch / kfor1 full: {_verdict(patch_vs_full, TARGETS['patch_vs_full'])}"
    )
    return {
        "timings": timings, "ratio": ratio, "patch_vs_full": patch_vs_full,
        "torch_patch_vs_full": torch_patch_vs_full,
        "targets": {"ratio": TARGETS["full_step"], "patch_vs_full": TARGETS["patch_vs_full"]},
        "met": {"ratio": ratio >= TARGETS["full_step"],
                "patch_vs_full": patch_vs_full >= TARGETS["patch_vs_full"]},
    }, text


def section_k_tasks(bench: Bench) -> tuple[dict[str, Any], str]:
    a = bench.args
    workloads = [bench.kfor1_train(PATCH, k) for k in a.ks]
    timings = measure(workloads, a.warmup, a.repeats, a.settle, a.pause)
    base = timings[workloads[0].name]
    single = sum(workloads[0].extra["state_bytes"].values())
    full_variables = tree_bytes(bench.variables)
    if ("kfor1_train", "full", 1) in bench.cache:
        full_state = sum(bench.kfor1_train("full", 1).extra["state_bytes"].values())
    else:  # Not built by another section: build the state (uncompiled) to weigh it.
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
            "k_full_finetune_states_bytes": k * full_state,
        }
        rows.append(
            f"| {k} | {t['images_per_s']:.1f} | {rel:.2f} ({rel_best:.2f}) "
            f"| {state / 2**20:.1f} | {k * single / 2**20:.1f} ({k * single / state:.1f}x) "
            f"| {k * full_variables / 2**20:.1f} ({k * full_variables / state:.1f}x) "
            f"| {k * full_state / 2**20:.1f} ({k * full_state / state:.1f}x) |"
        )
    worst = min(v["relative_to_k1"] for v in out.values())
    table = [
        f"| K ({PATCH}, {a.batch} img/task, {a.resolution} px) | img/s | vs K=1 median (best) "
        "| K-task state MiB | K single-task states MiB | K full models MiB "
        "| K full fine-tuning states MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
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


def matmul_peak(n: int, repeats: int) -> dict[str, Any]:
    """float32 n x n matmul GFLOP/s, jnp.dot and torch.mm alternated (median and best)."""
    rng = np.random.default_rng(1)
    a_np, b_np = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    dot = jax.jit(jnp.dot)
    steps = max(1, int(2e10 // (2 * n**3)))  # About 20 GFLOP per repetition.
    workloads = [Workload("jnp.dot", lambda: dot(a, b), lambda _: None, 1, steps),
                 Workload("torch.mm", lambda: torch.mm(ta, tb), lambda _: None, 1, steps)]
    timings = measure(workloads, 2, repeats)
    flops = 2.0 * n**3
    return {name: {"gflops": flops / t["step_s_median"] / 1e9,
                   "gflops_best": flops / min(t["step_s"]) / 1e9, "n": n}
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
    paths = {
        "inference": (bench.kfor1_infer("auto"), bench.torch_infer(True), "inference"),
        "patch step": (bench.kfor1_train(PATCH, 1), bench.torch_train("patch"), "patch_step"),
        "full step": (bench.kfor1_train("full", 1), bench.torch_train("full"), "full_step"),
    }
    # Step times: every repetition of the sections that measured a path (pooled, median);
    # paths that no section measured are measured here.
    step_s: dict[str, list[float]] = {}
    for section in bench.results.values():
        for name, timing in section.get("timings", {}).items():
            step_s.setdefault(name, []).extend(timing["step_s"])  # Seconds per step.
    missing = [w for kf, tc, _ in paths.values() for w in (kf, tc) if w.name not in step_s]
    if missing:
        for name, timing in measure(missing, a.warmup, a.repeats, a.settle, a.pause).items():
            step_s[name] = list(timing["step_s"])
    peak = matmul_peak(a.matmul_size, a.repeats)
    peak_gflops = peak["jnp.dot"]["gflops"]
    rows, out = [], {}
    for path, (kf, tc, _) in paths.items():
        # XLA's cost analysis counts a loop body once: take the micro-batched inference's counts
        # from the same computation over the whole batch.
        xla = (bench.kfor1_infer(None) if kf.extra.get("micro_batch") else kf).extra["cost"]
        for w, flops_xla in ((kf, xla["flops"]), (tc, None)):
            t = statistics.median(step_s[w.name])
            model_gflops = model_flops[path] / t / 1e9
            entry = {"step_s": t, "repetitions": len(step_s[w.name]),
                     "model_flops": model_flops[path], "model_gflops_per_s": model_gflops,
                     "fraction_of_jnp_dot_peak": model_gflops / peak_gflops}
            xla_cell = intensity = "-"
            if flops_xla is not None:
                entry.update(xla_flops=flops_xla, xla_bytes_accessed=xla["bytes_accessed"],
                             xla_gflops_per_s=flops_xla / t / 1e9)
                xla_cell = f"{flops_xla / 1e9:.2f} / {flops_xla / t / 1e9:.1f}"
                intensity = f"{flops_xla / xla['bytes_accessed']:.1f}"
            out.setdefault(path, {})[w.name] = entry
            rows.append(
                f"| {path} | {w.name} | {t * 1e3:.0f} | {model_flops[path] / 1e9:.2f} "
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
        + f"\nmatmul peak ({a.matmul_size}x{a.matmul_size} float32): jnp.dot "
        f"{peak['jnp.dot']['gflops']:.1f} GFLOP/s (best {peak['jnp.dot']['gflops_best']:.1f}), "
        f"torch.mm {peak['torch.mm']['gflops']:.1f} (best {peak['torch.mm']['gflops_best']:.1f})"
        + "\nmodel GFLOP: 2 x MACs of the convolutions and classifier (forward; training adds "
        "input gradients of all but the stem, and weight gradients of trained layers); XLA "
        "GFLOP: `compiled.cost_analysis()['flops']`, which also counts elementwise work."
    )
    return {"paths": out, "analytic_macs_per_image": macs, "model_flops": model_flops,
            "matmul_peak": peak}, text


SECTION_FUNCTIONS = {
    "patch_step": ("1. Patch training step", section_patch_step),
    "inference": ("2. Inference", section_inference),
    "full_step": ("3. Full fine-tuning step", section_full_step),
    "k_tasks": ("4. K-task step", section_k_tasks),
    "patch_files": ("5. Patch file size", section_patch_files),
    "flops": ("6. Distance from the limit", section_flops),
}


# ---------------------------------------------------------------------------------------------
# Command line.


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="efficientnet_lite0",
                        help="the network, with its packaged ImageNet weights (default: "
                        "%(default)s; mobilenet_v2 is the paper's base)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="images per step (per task)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ks", type=_int_list, default=[1, 2, 4, 8],
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
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(SECTIONS), help=f"sections, from {','.join(SECTIONS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--tiny", action="store_true",
        help="32 px, batch 2, K=1,2, 1 step, 1 warmup, 1 repeat, unoptimised XLA compilation: "
        "checks that the code runs (its numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.batch, args.ks = 32, 2, [1, 2]
        args.steps = args.infer_steps = args.warmup = args.repeats = 1
        args.settle = 0
        args.pause = 0.0
        args.matmul_size = 256
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    for name in ("resolution", "batch", "classes", "steps", "infer_steps", "repeats",
                 "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 1 or args.settle < 0 or args.pause < 0:
        parser.error("--warmup must be at least 1, --settle and --pause at least 0")
    if not args.ks or min(args.ks) < 1 or args.ks[0] != 1:
        parser.error("--ks must start with 1 (the baseline), e.g. 1,2,4")
    return args


def machine() -> dict[str, Any]:
    return {
        "jax_device": str(jax.devices()[0]), "jax_platform": jax.devices()[0].platform,
        "torch_device": str(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
        "flax_version": flax.__version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "processor": platform.processor(),
        # Allocator and threading settings change CPU timings (see benchmarks/README.md).
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(
            ("MALLOC_", "XLA_FLAGS", "LD_PRELOAD", "OMP_", "MKL_", "TF_CPP"))},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected sections; prints a markdown table per section; optionally writes JSON."""
    args = parse_args(argv)
    # As kfor1's entry points do; PyTorch, in the same process, gets the same allocator.
    kept = keep_freed_memory()
    torch.set_num_threads(os.cpu_count() or 1)  # XLA:CPU uses every core by default.
    info = machine()
    info["keep_freed_memory"] = kept
    print(f"jax device: {info['jax_device']} ({info['jax_platform']}), torch device: "
          f"{info['torch_device']} ({info['torch_threads']} threads), {info['cpu_count']} CPU "
          f"cores, jax {info['jax_version']}, flax {info['flax_version']}, torch "
          f"{info['torch_version']}, load average {os.getloadavg()}", flush=True)
    print(f"environment: {info['environment'] or '(no allocator/threading variables set)'}; "
          f"glibc keeps freed memory: {kept}", flush=True)
    print(f"{args.model}, {args.resolution} px, batch {args.batch}, {args.classes} classes; "
          f"{args.warmup} warm-up steps, {args.repeats} repetitions of {args.settle} untimed + "
          f"{args.steps} training / {args.infer_steps} inference steps", flush=True)
    results: dict[str, Any] = {
        "machine": info, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
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
        section.update(load_average_before=load_before, load_average_after=os.getloadavg(),
                       wall_s=time.perf_counter() - start)
        results["sections"][name] = bench.results[name] = section
        print(f"\n## {title} (`{name}`)\n\n{text}\n\nload average {load_before[0]:.2f} -> "
              f"{os.getloadavg()[0]:.2f}, {section['wall_s']:.0f} s", flush=True)
    results["checks"] = bench.results.get("checks", {})
    results["load_average_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=_json_default)
            f.write("\n")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
