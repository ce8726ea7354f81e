"""Throughput of the two convolution paths of ``kfor1.layers``: XLA's vs kfor1's ``fast_cpu``.

``conv_impl="xla"`` lowers depthwise convolutions to XLA grouped convolutions (slow on XLA:CPU);
``conv_impl="fast_cpu"`` uses shifted multiply-adds for depthwise and ``dot_general`` for 1x1.
Both have the same parameters, so this measures only speed, for eval-mode inference and for a
full training step (gradients of all parameters, BatchNorm in train mode, an SGD update).

Run from the repository root::

    python -m benchmarks.suite.conv_impl --resolution 128 --batch 32 --json results.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    cell_parser,
    machine,
    machine_line,
    time_steps,
    tiny_compiler_options,
    warm_up,
    write_json,
)
from kfor1.models import create

IMPLS = ("xla", "fast_cpu")
WORKLOADS = ("inference", "train step")
LEARNING_RATE = 0.01


def random_variables(model: Any, image_shape: tuple[int, ...], seed: int = 0) -> Any:
    """Variables of ``model`` drawn with NumPy: speed does not depend on their values, and
    ``model.init`` spends tens of seconds on CPU compiling its random initialisers.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "kernel":  # He-style scale keeps activations finite through the network.
            fan_in = int(np.prod(leaf.shape[:-1])) or 1
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:  # Biases and running means.
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_functions(
    model_name: str, impl: str, resolution: int, batch: int, seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
    """Per workload, a ``run()`` returning device arrays and an ``update(result)`` hook.

    Training threads its parameters from step to step, as a real loop does, so XLA cannot
    reuse results and buffers can be donated.
    """
    model = create(model_name, conv_impl=impl)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, resolution, resolution, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, batch))
    variables = random_variables(model, (1, resolution, resolution, 3), seed)
    jit = functools.partial(jax.jit, compiler_options=compiler_options)

    @jit
    def infer(variables: Any, images: jax.Array) -> jax.Array:
        return model.apply(variables, images)

    def train_step(
        params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array, key: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"], rngs={"dropout": key},
            )
            log_probs = jax.nn.log_softmax(logits)
            loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return params, new_stats, loss

    train = jit(train_step, donate_argnums=(0, 1))
    # Copies: training donates (frees) its input buffers, which inference still reads.
    state = {
        "params": jax.tree.map(jnp.copy, variables["params"]),
        "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"]),
        "key": jax.random.key(seed + 1),
    }

    def run_train() -> Any:
        state["key"], key = jax.random.split(state["key"])
        return train(state["params"], state["batch_stats"], images, labels, key)

    def update_train(result: Any) -> None:
        state["params"], state["batch_stats"], _ = result

    return {
        "inference": (lambda: infer(variables, images), lambda _: None),
        "train step": (run_train, update_train),
    }


def benchmark(
    model: str, resolution: int, batch: int, steps: int, warmup: int, repeats: int,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measures every workload for every implementation; images/s is from the median step.

    Repetitions alternate between implementations, so a burst of load from another process
    slows both rather than skewing the speedup.
    """
    results: dict[str, Any] = {
        "model": model, "resolution": resolution, "batch": batch, "steps": steps,
        "warmup": warmup, "repeats": repeats, **machine(),
        "compiler_options": compiler_options or {}, "timings": {},
        # Other processes on the machine skew CPU timings; the load average shows if they ran.
        "load_average_before": os.getloadavg(),
    }
    functions = {
        impl: make_functions(model, impl, resolution, batch, compiler_options=compiler_options)
        for impl in IMPLS
    }
    for workload in WORKLOADS:
        timings = {
            impl: {"first_call_s": warm_up(*functions[impl][workload], warmup), "step_s": []}
            for impl in IMPLS
        }
        for _ in range(repeats):
            for impl in IMPLS:
                timings[impl]["step_s"].append(time_steps(*functions[impl][workload], steps))
        for timing in timings.values():
            timing["images_per_s"] = batch / statistics.median(timing["step_s"])
            # Contention only adds time, so the fastest repetition bounds the quiet-machine rate.
            timing["images_per_s_best"] = batch / min(timing["step_s"])
        results["timings"][workload] = timings
    results["load_average_after"] = os.getloadavg()
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Images/s per workload and implementation, with fast_cpu's speedup over xla."""
    lines = [
        f"| {results['model']} @ {results['resolution']} px, batch {results['batch']} "
        "| xla (img/s) | fast_cpu (img/s) | speedup | first call xla / fast_cpu (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for workload, by_impl in results["timings"].items():
        xla, fast = by_impl["xla"], by_impl["fast_cpu"]
        lines.append(
            f"| {workload} | {xla['images_per_s']:.1f} | {fast['images_per_s']:.1f} "
            f"| {fast['images_per_s'] / xla['images_per_s']:.2f}x "
            f"| {xla['first_call_s']:.1f} / {fast['first_call_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cell_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile included)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument(
        "--tiny", action="store_true",
        help="resolution 32, batch 2, 1 step, 1 warmup, 1 repeat, unoptimised compilation: "
        "checks that the code runs (its numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.batch, args.steps, args.warmup, args.repeats = 32, 2, 1, 1, 1
    for name in ("resolution", "batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first call compiles)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the device and a markdown table, optionally writes JSON."""
    args = parse_args(argv)
    print(machine_line(), flush=True)
    results = benchmark(args.model, args.resolution, args.batch, args.steps, args.warmup,
                        args.repeats, tiny_compiler_options(args.tiny))
    print(markdown_table(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
