"""The suite's measured objects: the networks compared (kfor1's and PyTorch's), the workloads
built from them once per cell of the grid, and the alternating timer (``measure``).

A *cell* is one (model, resolution, batch, precision) point; ``Bench`` holds its pretrained
variables, random images and every compiled kfor1 function and PyTorch module, built on first
use and shared by the sections (``benchmarks/suite/sections.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import kfor1
from benchmarks.common import time_steps, tiny_compiler_options, warm_up
from benchmarks.suite import torch_lite, torch_mobilenet
from kfor1.cpu import release_freed_memory
from kfor1.microbatch import MicroBatch, map_micro_batches, resolve_micro_batch
from kfor1.models import packaged_weights_path

PATCH = "scale_bias+logits"
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4


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
    compiled: Any = None  # kfor1's executable (its HLO: benchmarks/profiles/hlo.py), not reported.


def measure(
    workloads: Sequence[Workload], warmup: int, repeats: int, settle: int = 1,
    pause: float = 0.0, release: bool = True,
) -> dict[str, Any]:
    """Warms each workload up, then times ``repeats`` repetitions, alternating between them.

    Each repetition starts with the freed memory returned to the OS, ``pause`` seconds of idle
    and ``settle`` untimed steps: right
    after another workload its worker threads still spin for a while (PyTorch's OpenMP threads
    beside XLA's: kfor1's inference ran at 772 img/s without a pause, 976 with 0.5 s), and the
    first step after switching is slower (the allocator and caches were shaped by the other
    one; a K=1 step after a K=8 step takes up to twice as long). A training loop sees neither.
    Images/s are from the median repetition; ``images_per_s_best`` from the fastest (contention
    only adds time, so it bounds the quiet-machine rate).
    """
    first = {}
    for w in workloads:
        if release:
            release_freed_memory()
        first[w.name] = warm_up(w.run, w.update, warmup)
    step_s: dict[str, list[float]] = {w.name: [] for w in workloads}
    for _ in range(repeats):
        for w in workloads:
            # Pages the workload before freed go back to the OS (kfor1.cpu.release_freed_memory):
            # the process then holds one workload's peak, not the sum; the settle step below
            # faults them in again.
            if release:
                release_freed_memory()
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


class _CudaResult:
    """A PyTorch step's output on a GPU: ``jax.block_until_ready`` (which the timer calls on
    whatever a workload returns) calls ``block_until_ready`` on it, and that waits for the GPU,
    so PyTorch's queued kernels are inside the timed interval as XLA's are."""

    def __init__(self, value: Any):
        self.value = value

    def block_until_ready(self) -> _CudaResult:
        torch.cuda.synchronize()
        return self


def torch_device(name: str) -> torch.device:
    """``auto``: the GPU where JAX runs on one and PyTorch sees one (the comparison is then
    GPU against GPU), else the CPU."""
    if name == "auto":
        gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        name = "cuda" if gpu else "cpu"
    return torch.device(name)


class Bench:
    """The pretrained model, data and every workload of one cell, built once and shared between
    sections.

    ``args.precision == "bfloat16"`` computes in bfloat16 on both sides with float32
    parameters: kfor1's model with ``dtype=bfloat16`` (Flax casts the parameters as each layer
    reads them), PyTorch under ``torch.autocast`` (its AMP).
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.reference = MODELS[args.model]
        self.device = torch_device(args.torch_device)
        self.bf16 = args.precision == "bfloat16"
        # --tiny only checks the code: skip LLVM optimisation, which is most of the compile time.
        self.compiler_options = tiny_compiler_options(args.tiny)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "head re-initialised": a 10-class task.
            self.pretrained = kfor1.load_pretrained(args.model, num_classes=args.classes)
        self.model = self.pretrained.model.clone(
            dropout_rate=0.0, dtype=jnp.bfloat16 if self.bf16 else None)
        self.variables = self.pretrained.variables
        self.weights_path = packaged_weights_path(args.model)
        k = max(args.ks)
        rng = np.random.default_rng(0)
        shape = (k, args.batch, args.resolution, args.resolution, 3)
        self.images = rng.normal(size=shape).astype(np.float32)
        self.labels = rng.integers(0, args.classes, (k, args.batch))
        # PyTorch's input: the first task's images, NCHW shape in channels_last memory.
        self.torch_images = torch.from_numpy(self.images[0]).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last).to(self.device)
        self.torch_labels = torch.from_numpy(self.labels[0]).long().to(self.device)
        self.cache: dict[Any, Workload] = {}
        self.results: dict[str, Any] = {}

    # The workloads' names: sections find each other's timings by them (``bench.results``).

    @staticmethod
    def train_name(spec: str, k: int) -> str:
        return f"kfor1 {spec} K={k}"

    @staticmethod
    def torch_train_name(trainable: str) -> str:
        return f"torch {trainable}"

    def infer_name(self, micro_batch: MicroBatch = None) -> str:
        size = resolve_micro_batch(micro_batch, self.args.batch)
        return "kfor1 jit(model.apply)" + (f" in micro-batches of {size}" if size else "")

    def torch_infer_name(self, fast: bool) -> str:
        if not self.reference.fast_differs:
            return "torch (padding in conv, exact)"
        return "torch (padding in conv)" if fast else "torch exact (TF-SAME via F.pad)"

    def release(self) -> None:
        """Drops every built workload. A compiled XLA:CPU step keeps its working memory between
        calls (a full step at 224 px, batch 128: ~7.6 GB), so a cell that kept all of its
        workloads went past 24 GB; sections find earlier timings in ``results``."""
        self.cache.clear()
        gc.collect()
        release_freed_memory()

    def timing(self, name: str) -> dict[str, Any] | None:
        """The first timing of workload ``name`` that a section of this cell recorded."""
        for section in self.results.values():
            if name in section.get("timings", {}):
                return section["timings"][name]
        return None

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
            self.train_name(spec, k), lambda: compiled(holder["state"], batch, key), update,
            k * self.args.batch, self.args.steps, compile_s,
            {"state_bytes": state_bytes, "cost": cost(compiled)}, compiled,
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
        name = self.infer_name(micro_batch)
        return Workload(name, lambda: compiled(variables, images), lambda _: None,
                        self.args.batch, self.args.infer_steps, compile_s,
                        {"cost": cost(compiled), "micro_batch": size}, compiled)

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
        return model.to(self.device, memory_format=torch.channels_last)

    def _autocast(self) -> Any:
        """PyTorch's AMP (bfloat16) in a bfloat16 cell, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _torch_result(self, value: torch.Tensor) -> Any:
        return _CudaResult(value) if self.device.type == "cuda" else value

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

        def run() -> Any:
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return self._torch_result(loss.detach())

        return Workload(self.torch_train_name(trainable), run, lambda _: None, self.args.batch,
                        self.args.steps, None,
                        {"trainable_parameters": sum(p.numel() for p in params)})

    @_cached
    def torch_infer(self, fast: bool) -> Workload:
        model = self.torch_model(fast).eval()
        x = self.torch_images

        def run() -> Any:
            with torch.inference_mode(), self._autocast():
                return self._torch_result(model(x))

        return Workload(self.torch_infer_name(fast), run, lambda _: None, self.args.batch,
                        self.args.infer_steps)

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


