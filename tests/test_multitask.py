"""K-task state: ``init_multitask`` stacks patches, BN statistics and heads on a task axis and
stores shared parameters once; ``task_variables`` gives one task's plain Flax variables.

Read as a specification of ``kfor1.multitask.state`` (with the step that trains the state).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import (
    TOL,
    TinyCNN,
    array_leaves,
    build_state,
    make_batch,
    run_steps,
    split_flat,
)

from kfor1.multitask.state import Task, task_variables
from kfor1.multitask.step import make_predict_fn, make_train_step
from kfor1.patch.optim import patch_optimizer
from kfor1.patch.spec import SHARED
from kfor1.tree import flatten

# --- frozen shared parameters ----------------------------------------------------------------


def test_frozen_backbone_mobilenet(mobilenet):
    """Adam, 3 steps: shared leaves are bitwise unchanged, every patch leaf of every task moves,
    and the optimiser keeps moments for patch leaves only."""
    model, variables = mobilenet
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state0 = build_state(variables, "scale_bias+logits", tasks)
    step = make_train_step(model, optimizer, donate=False)
    batches = [make_batch(s, (5, 5), size=32) for s in range(3)]
    state, losses = run_steps(step, state0, batches)
    chex.assert_shape(losses, (3, 2))
    assert state.step == 3

    patch0, shared0 = split_flat(state0)
    patch, shared = split_flat(state)
    chex.assert_trees_all_equal(shared, shared0)
    assert shared.keys() == {p for p in flatten(variables["params"]) if p.endswith("kernel")
                             and not p.startswith("head")}
    for path, value in patch.items():
        chex.assert_shape(value, (2, *flatten(variables["params"])[path].shape))
        for k in range(2):
            assert not np.array_equal(value[k], patch0[path][k]), f"{path} of task {k} unchanged"
    # Per-task BN statistics moved too, separately for each task.
    for path, value in flatten(state.batch_stats).items():
        assert value.shape[0] == 2
        assert not np.array_equal(value[0], value[1]), path

    opt_state = state.opt_state
    assert array_leaves(opt_state.inner_states[SHARED]) == []
    patch_elements = sum(int(v.size) for v in patch.values())
    shared_shapes = {v.shape for v in shared.values()}
    leaves = array_leaves(opt_state)
    scalars = [x for x in leaves if x.ndim == 0]
    assert len(scalars) <= 2  # adam's step count
    assert not [x for x in leaves if x.shape in shared_shapes]
    assert sum(int(x.size) for x in leaves) == 2 * patch_elements + len(scalars)


def test_identical_tasks_get_identical_patches(tiny):
    _, state = build_state(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 5)])
    batch = make_batch(0, (5,))
    batch = {name: jnp.concatenate([v, v]) for name, v in batch.items()}
    optimizer = patch_optimizer(optax.adam(1e-2), state.layout.labels)
    state, _ = run_steps(make_train_step(TinyCNN(), optimizer, donate=False), state, [batch] * 2)
    chex.assert_trees_all_close(task_variables(state, 0), task_variables(state, 1), **TOL)


# --- heterogeneous heads ---------------------------------------------------------------------


@pytest.mark.parametrize("classes", [(10, 3), (10, 102)])
def test_heterogeneous_heads(classes):
    width = max(classes)
    base = TinyCNN(10)
    variables = base.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    tasks = [Task("ten", classes[0]), Task("other", classes[1])]
    optimizer, state = build_state(variables, "scale_bias+logits", tasks)
    kernel = state.params["head"]["kernel"]
    chex.assert_shape(kernel, (2, 16, width))
    # The 10-class task starts from the pretrained head, the other from zeros; padding is zero.
    np.testing.assert_array_equal(kernel[0, :, :10], variables["params"]["head"]["kernel"])
    np.testing.assert_array_equal(kernel[1], 0)
    np.testing.assert_array_equal(kernel[0, :, 10:], 0)

    model = TinyCNN(width)
    step = make_train_step(model, optimizer, donate=False)
    state, losses = run_steps(step, state, [make_batch(s, classes) for s in range(3)])
    assert np.all(np.isfinite(losses))

    images = make_batch(9, classes)["images"]
    probs = make_predict_fn(model)(state, images)
    chex.assert_shape(probs, (2, 4, width))
    chex.assert_trees_all_close(probs.sum(-1), jnp.ones((2, 4)), **TOL)
    for k, n in enumerate(classes):
        assert np.all(np.asarray(probs[k, :, n:]) == 0.0), "padded classes get probability 0"
        assert np.all(np.argmax(probs[k], -1) < n)
        variables_k = task_variables(state, tasks[k].name)
        chex.assert_shape(variables_k["params"]["head"]["kernel"], (16, n))
        chex.assert_shape(variables_k["params"]["head"]["bias"], (n,))
        logits = TinyCNN(n).apply(variables_k, images[k])
        chex.assert_trees_all_close(jax.nn.softmax(logits), probs[k, :, :n], **TOL)
    # The padded head columns stay exactly zero through training.
    np.testing.assert_array_equal(state.params["head"]["kernel"][1, :, classes[1]:], 0)
    np.testing.assert_array_equal(state.params["head"]["bias"][1, classes[1]:], 0)
