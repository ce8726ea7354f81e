"""Sharded multi-task training: the same run on one device and on a ('task', 'data') mesh of 8
simulated CPU devices (see conftest.py) gives the same patches, statistics and losses.

Read as a specification of ``kfor1.multitask.sharding`` and of ``init_multitask(..., mesh=...)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import TinyCNN, pretrained_like

from kfor1.multitask.sharding import make_mesh, shard_batch, shard_state
from kfor1.multitask.state import Task, init_multitask, task_variables
from kfor1.multitask.step import make_train_step
from kfor1.patch.optim import patch_optimizer
from kfor1.patch.spec import partition
from kfor1.tree import flatten

TOL = dict(atol=1e-5, rtol=1e-5)
STEPS = 3


@pytest.fixture(scope="module")
def variables():
    return pretrained_like()


@pytest.fixture(scope="module")
def labels(variables):
    return partition(variables, "scale_bias+logits")


@pytest.fixture(scope="module")
def optimizer(labels):
    return patch_optimizer(optax.adam(1e-2), labels)


def tasks_for(k):
    return [Task(f"t{i}", 5 if i % 2 == 0 else 3) for i in range(k)]


def batches_for(k, batch, steps=STEPS):
    out = []
    for s in range(steps):
        key_images, key_labels = jax.random.split(jax.random.key(100 + s))
        images = jax.random.normal(key_images, (k, batch, 16, 16, 3))
        labels = jax.random.randint(key_labels, (k, batch), 0, 3)  # in range for 3 and 5 classes
        out.append({"images": np.asarray(images), "labels": np.asarray(labels, np.int32)})
    return out


def run(variables, labels, optimizer, k, batch, mesh=None, state=None, task_chunk="auto"):
    if state is None:
        state = init_multitask(variables, labels, tasks_for(k), optimizer, mesh=mesh)
    step = make_train_step(TinyCNN(5), optimizer, donate=False, task_chunk=task_chunk)
    losses = []
    for i, b in enumerate(batches_for(k, batch)):
        if mesh is not None:
            b = shard_batch(b, mesh)
        state, metrics = step(state, b, jax.random.key(i))
        losses.append(metrics["loss"])
    return state, jnp.stack(losses)


def assert_same_run(a, b):
    (state_a, losses_a), (state_b, losses_b) = a, b
    chex.assert_trees_all_close(jax.device_get(losses_a), jax.device_get(losses_b), **TOL)
    chex.assert_trees_all_close(jax.device_get(state_a.params), jax.device_get(state_b.params),
                                **TOL)
    chex.assert_trees_all_close(jax.device_get(state_a.batch_stats),
                                jax.device_get(state_b.batch_stats), **TOL)
    assert int(state_a.step) == int(state_b.step) == STEPS


def is_sharded_like(x, sharding):
    return x.sharding.is_equivalent_to(sharding, x.ndim)


def flat_params_sharding(state):
    return {p: v.sharding for p, v in flatten(state.params).items()}


_BASELINES = {}


def baseline(variables, labels, optimizer, k, batch):
    """The single-device run (cached per (K, B))."""
    if (k, batch) not in _BASELINES:
        _BASELINES[k, batch] = run(variables, labels, optimizer, k, batch)
    return _BASELINES[k, batch]


def test_eight_simulated_devices():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"


@pytest.mark.parametrize(
    "tasks_axis, data_axis, k, batch",
    [(2, 4, 4, 8), (8, 1, 8, 4), (1, 8, 2, 8)],
    ids=["2x4", "8x1", "1x8"],
)
def test_mesh_run_equals_single_device_run(
    variables, labels, optimizer, tasks_axis, data_axis, k, batch
):
    mesh = make_mesh(tasks_axis, data_axis)
    assert dict(mesh.shape) == {"task": tasks_axis, "data": data_axis}
    state = init_multitask(variables, labels, tasks_for(k), optimizer, mesh=mesh)

    # Patches and per-task BN statistics are split along 'task', shared leaves replicated.
    patch = state.layout.patch_paths()
    stacked, replicated = NamedSharding(mesh, P("task")), NamedSharding(mesh, P())
    for path, leaf in flatten(state.params).items():
        if path in patch:
            assert leaf.sharding.spec == P("task"), path
            assert leaf.addressable_shards[0].data.shape[0] == k // tasks_axis
        else:
            assert leaf.sharding.spec == P(), path
            assert leaf.sharding.is_fully_replicated
    for path, leaf in flatten(state.batch_stats).items():
        assert leaf.shape[0] == k and leaf.sharding.spec == P("task"), path
    # The optimiser state was built on the placed parameters: moments follow them.
    mu = state.opt_state.inner_states["patch"].inner_state[0].mu
    for path, leaf in flatten(mu).items():
        if hasattr(leaf, "sharding"):
            assert is_sharded_like(leaf, stacked), path

    b = shard_batch(batches_for(k, batch)[0], mesh)
    assert b["images"].sharding.spec == P("task", "data")
    assert b["labels"].sharding.spec == P("task", "data")
    assert b["images"].addressable_shards[0].data.shape == (
        k // tasks_axis, batch // data_axis, 16, 16, 3
    )

    sharded = run(variables, labels, optimizer, k, batch, mesh=mesh, state=state)
    assert_same_run(sharded, baseline(variables, labels, optimizer, k, batch))
    # Training keeps the layout.
    final = sharded[0]
    for path, leaf in flatten(final.params).items():
        assert is_sharded_like(leaf, stacked if path in patch else replicated), path
    # Per-task variables come back whole from a sharded state.
    chex.assert_shape(task_variables(final, k - 1)["params"]["head"]["kernel"], (16, 3))


@pytest.mark.parametrize("tasks_axis, data_axis", [(2, 4), (1, 8)], ids=["2x4", "1x8"])
def test_tasks_in_chunks_on_a_mesh_equal_single_device_run(
    variables, labels, optimizer, tasks_axis, data_axis
):
    """Chunks of tasks slice the task axis, also when the mesh splits it over devices."""
    mesh = make_mesh(tasks_axis, data_axis)
    sharded = run(variables, labels, optimizer, 4, 8, mesh=mesh, task_chunk=1)
    assert_same_run(sharded, baseline(variables, labels, optimizer, 4, 8))


def test_shard_state_places_existing_optimizer_state(variables, labels, optimizer):
    k, batch = 4, 8
    state = init_multitask(variables, labels, tasks_for(k), optimizer)  # single device
    mesh = make_mesh(2, 4)
    with pytest.raises(ValueError, match="needs the optimizer"):
        shard_state(state, mesh)
    placed = shard_state(state, mesh, optimizer)
    stacked, replicated = NamedSharding(mesh, P("task")), NamedSharding(mesh, P())
    patch = placed.layout.patch_paths()
    adam = placed.opt_state.inner_states["patch"].inner_state[0]
    for moments in (adam.mu, adam.nu):
        flat = {p: v for p, v in flatten(moments).items() if hasattr(v, "sharding")}
        assert set(flat) == patch
        for path, leaf in flat.items():
            assert is_sharded_like(leaf, flat_params_sharding(placed)[path]), path
            assert is_sharded_like(leaf, stacked), path
    assert is_sharded_like(adam.count, replicated)
    assert is_sharded_like(placed.step, replicated)
    chex.assert_trees_all_equal(jax.device_get(placed.opt_state), jax.device_get(state.opt_state))

    sharded = run(variables, labels, optimizer, k, batch, mesh=mesh, state=placed)
    assert_same_run(sharded, baseline(variables, labels, optimizer, k, batch))


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="8 devices cannot be split into 3 task shards"):
        make_mesh(3)
    with pytest.raises(ValueError, match=r"needs 6 devices, 8 are available"):
        make_mesh(2, 3)
    assert dict(make_mesh(4).shape) == {"task": 4, "data": 2}
    assert dict(make_mesh().shape) == {"task": 1, "data": 8}


def test_tasks_must_divide_the_task_axis(variables, labels, optimizer):
    mesh = make_mesh(2, 4)
    message = "3 tasks cannot be split over a 'task' mesh axis of size 2"
    with pytest.raises(ValueError, match=message):
        init_multitask(variables, labels, tasks_for(3), optimizer, mesh=mesh)
    state = init_multitask(variables, labels, tasks_for(3), optimizer)
    with pytest.raises(ValueError, match=message):
        shard_state(state, mesh, optimizer)


def test_shard_batch_needs_task_and_batch_axes():
    mesh = make_mesh(2, 4)
    with pytest.raises(ValueError, match=r"must be \(K, B, ...\)"):
        shard_batch({"labels": np.zeros((8,), np.int32)}, mesh)
