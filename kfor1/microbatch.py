"""Work in chunks small enough that activations stay in cache: inference over a large batch
as a loop over small ones, and a K-task training step over a few tasks at a time.

In inference every image is independent (BatchNorm uses its running statistics), so a batch can
run as a sequence of micro-batches. On CPU that pays for large batches: EfficientNet-Lite0's
first expanded activations take 50 MB at 128 px for 32 images, and every layer streams them
through memory; in chunks of 16 images they stay in the caches. XLA:CPU runs a loop body with
less parallelism and slices every chunk in and out, which small batches do not win back; so
``"auto"`` splits CPU batches of at least ``CPU_MIN_BATCH`` images, and never on GPUs, which want
the whole batch (measured in ``benchmarks/README.md``).

Example:
  >>> rows = lambda x: x.sum(axis=(1, 2, 3))  # each row on its own, as a model in eval mode
  >>> x = jnp.ones((100, 32, 32, 3))
  >>> kfor1.microbatch.map_micro_batches(rows, x, micro_batch=16).shape  # last chunk padded
  (100,)
  >>> kfor1.microbatch.resolve_micro_batch("auto", batch=128)  # on the CPU backend; GPU: None
  16
  >>> kfor1.microbatch.resolve_task_chunk("auto", num_tasks=8, per_task_batch=32)  # 1 CPU
  2
  >>> a, b = jnp.ones((8, 3, 4)), jnp.ones((8, 4, 5))  # K=8 tasks on the leading axis
  >>> kfor1.microbatch.map_task_chunks(jnp.matmul, (a, b), chunk=2).shape
  (8, 3, 5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

MicroBatch = int | None | Literal["auto"]
TaskChunk = int | None | Literal["auto"]

CPU_MICRO_BATCH = 16
CPU_MIN_BATCH = 64
CPU_TASK_CHUNK_IMAGES = 64


def _check_size(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{name} must be a positive int, None (no chunks) or 'auto', got {value!r}"
        )


def resolve_micro_batch(micro_batch: MicroBatch, batch: int) -> int | None:
    """The chunk size for a ``batch`` of images; None runs the whole batch at once.

    ``"auto"``: ``CPU_MICRO_BATCH`` on the CPU backend for batches of ``CPU_MIN_BATCH`` or more.
    """
    if micro_batch == "auto":
        cpu = jax.default_backend() == "cpu"
        return CPU_MICRO_BATCH if cpu and batch >= CPU_MIN_BATCH else None
    _check_size("micro_batch", micro_batch)
    return micro_batch if micro_batch is None or micro_batch < batch else None


def map_micro_batches(
    fn: Callable[[Any], Any], x: Any, micro_batch: MicroBatch = "auto"
) -> Any:
    """``fn(x)`` computed over chunks of ``micro_batch`` rows of ``x`` in turn (``lax.map``).

    ``x`` is an array or a pytree of arrays with one leading (batch) size. ``fn`` must treat
    rows independently (eval mode). A batch that is not a multiple of the chunk is padded with
    zeros, whose outputs are dropped. Works under ``jit`` and ``vmap``.
    """
    batch = jax.tree.leaves(x)[0].shape[0]
    size = resolve_micro_batch(micro_batch, batch)
    if size is None:
        return fn(x)
    pad = -batch % size
    if pad:
        x = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), x)
    out = lax.map(fn, jax.tree.map(lambda a: a.reshape(-1, size, *a.shape[1:]), x))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:batch], out)


def resolve_task_chunk(task_chunk: TaskChunk, num_tasks: int, per_task_batch: int) -> int | None:
    """Tasks per chunk of a K-task training step; None trains all tasks in one ``vmap``.

    ``"auto"``: on a single CPU device, as many tasks as make ``CPU_TASK_CHUNK_IMAGES`` images
    (at least one); never on GPUs and TPUs, which want the whole batch, nor over several devices,
    where a chunk would leave the devices without its tasks idle.
    """
    if task_chunk == "auto":
        if jax.default_backend() != "cpu" or jax.device_count() != 1:
            return None
        task_chunk = max(1, CPU_TASK_CHUNK_IMAGES // max(1, per_task_batch))
    _check_size("task_chunk", task_chunk)
    return task_chunk if task_chunk is not None and task_chunk < num_tasks else None


def map_task_chunks(fn: Callable[..., Any], args: Sequence[Any], chunk: int | None) -> Any:
    """``jax.vmap(fn)(*args)``, computed over ``chunk`` tasks (leading axis of ``args``) at a
    time, one chunk after another, and concatenated.

    Why: training steps cannot split a task's batch (BatchNorm's statistics need all of it),
    but K tasks are independent. On 2 CPU cores an EfficientNet-Lite0 step over K=8 tasks of 32
    images ran 7-9% faster per image in chunks of two tasks: one chunk's activations stay in
    the 32 MB cache, eight tasks' do not. The chunks are unrolled in the compiled step, since
    XLA:CPU runs a loop body with less parallelism (``lax.map`` over chunks: 20% slower than
    one ``vmap``); compilation takes longer with every chunk.
    """
    n = jax.tree.leaves(args)[0].shape[0]
    if chunk is None or chunk >= n:
        return jax.vmap(fn)(*args)
    outs = [
        jax.vmap(fn)(*jax.tree.map(lambda a, i=i: a[i:i + chunk], args))
        for i in range(0, n, chunk)
    ]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
