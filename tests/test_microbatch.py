"""Inference in micro-batches computes exactly what one pass over the whole batch computes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import TinyCNN

import kfor1
from kfor1.microbatch import (
    CPU_MICRO_BATCH,
    CPU_MIN_BATCH,
    CPU_TASK_CHUNK_IMAGES,
    map_micro_batches,
    map_task_chunks,
    resolve_micro_batch,
    resolve_task_chunk,
)


def _model_and_variables(num_classes=5):
    model = TinyCNN(num_classes=num_classes)
    x = jnp.zeros((1, 16, 16, 3))
    return model, model.init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize("batch,micro_batch", [(8, 4), (10, 4), (3, 4), (7, 1), (6, None)])
def test_micro_batches_match_the_whole_batch(batch, micro_batch):
    model, variables = _model_and_variables()
    x = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))

    def apply(images):
        return model.apply(variables, images, train=False)

    out = jax.jit(lambda x: map_micro_batches(apply, x, micro_batch))(x)
    chex.assert_shape(out, (batch, 5))
    chex.assert_trees_all_close(out, apply(x), atol=1e-5, rtol=1e-5)


def test_pytree_outputs_and_vmap_over_tasks():
    x = jax.random.normal(jax.random.key(2), (3, 10, 4))  # (tasks, batch, features)

    def fn(rows):
        return {"sum": rows.sum(-1), "double": 2 * rows}

    out = jax.vmap(lambda t: map_micro_batches(fn, t, 4))(x)
    chex.assert_trees_all_close(out, jax.vmap(fn)(x))


def test_auto_micro_batches_large_batches_on_cpu_only(monkeypatch):
    assert resolve_micro_batch("auto", CPU_MIN_BATCH) == CPU_MICRO_BATCH  # Tests run on CPU.
    assert resolve_micro_batch("auto", CPU_MIN_BATCH - 1) is None
    assert resolve_micro_batch(8, 8) is None  # One chunk is the whole batch.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_micro_batch("auto", 1024) is None


@pytest.mark.parametrize("bad", [0, -2, 2.5, "eight", True])
def test_bad_micro_batch_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match="positive int, None"):
        resolve_micro_batch(bad, 32)


def test_predict_and_eval_step_are_unchanged_by_micro_batching():
    model, variables = _model_and_variables()
    labels = kfor1.partition(variables, "scale_bias+logits")
    tasks = [kfor1.Task("a", 5), kfor1.Task("b", 3)]
    state = kfor1.init_multitask(variables, labels, tasks)
    images = jax.random.normal(jax.random.key(3), (2, 11, 16, 16, 3))
    batch = {"images": images, "labels": jnp.asarray(np.arange(22).reshape(2, 11) % 3)}
    whole = kfor1.make_predict_fn(model, micro_batch=None)(state, images)
    chunked = kfor1.make_predict_fn(model, micro_batch=4)(state, images)
    chex.assert_trees_all_close(chunked, whole, atol=1e-6)
    chex.assert_trees_all_close(
        kfor1.make_eval_step(model, micro_batch=4)(state, batch),
        kfor1.make_eval_step(model, micro_batch=None)(state, batch), atol=1e-5,
    )


@pytest.mark.parametrize("tasks,chunk", [(5, 2), (4, 4), (3, 1), (3, None)])
def test_task_chunks_match_one_vmap(tasks, chunk):
    x = jax.random.normal(jax.random.key(3), (tasks, 6, 4))
    w = jax.random.normal(jax.random.key(4), (tasks, 4))

    def fn(rows, weights):
        return {"out": jnp.tanh(rows @ weights), "norm": jnp.sum(weights**2)}

    out = jax.jit(lambda x, w: map_task_chunks(fn, (x, w), chunk))(x, w)
    chex.assert_trees_all_close(out, jax.vmap(fn)(x, w), atol=1e-6)


def test_auto_task_chunks_make_cpu_chunks_of_64_images(monkeypatch):
    assert CPU_TASK_CHUNK_IMAGES == 64
    assert resolve_task_chunk("auto", 8, 32) is None  # The tests simulate 8 CPU devices.
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert resolve_task_chunk("auto", 8, 32) == 2
    assert resolve_task_chunk("auto", 8, 16) == 4
    assert resolve_task_chunk("auto", 8, 128) == 1  # A task is never split.
    assert resolve_task_chunk("auto", 2, 32) is None  # One chunk holds every task.
    assert resolve_task_chunk(3, 3, 32) is None
    assert resolve_task_chunk(None, 8, 32) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_task_chunk("auto", 8, 32) is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", False])
def test_bad_task_chunk_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match="task_chunk must be a positive int, None"):
        resolve_task_chunk(bad, 4, 32)
