"""The multi-task engine: K task patches trained in one step, as if each were trained alone.

Read as a specification of ``init_multitask``, ``make_train_step``, ``make_eval_step``,
``make_predict_fn``, ``task_variables`` and ``patch_optimizer``. Most tests use a tiny CNN
(stem conv + BN, depthwise conv + BN, 1x1 conv + BN, Dense head) at 16 px; the frozen-backbone
test uses the paper's MobileNetV2 (width 0.35) at 32 px.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import TinyCNN

import kfor1
from kfor1.multitask import Task, init_multitask, task_variables
from kfor1.optim import patch_optimizer
from kfor1.spec import SHARED, flatten, partition, unflatten
from kfor1.step import make_eval_step, make_predict_fn, make_train_step

TOL = dict(atol=1e-5, rtol=1e-5)


BASE_CLASSES = 5


@pytest.fixture(scope="module")
def tiny():
    """Pretrained-like variables of a 5-class TinyCNN: BN scales and biases away from 1 and 0
    (at bias 0, ReLU then a per-channel op then BN makes a BN scale's gradient exactly 0, and
    Adam would turn rounding noise into updates) and non-trivial BN statistics."""
    model = TinyCNN(BASE_CLASSES)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    flat = flatten(variables["params"])
    for i, path in enumerate(sorted(flat)):
        if path.endswith(("_bn/scale", "_bn/bias")):
            noise = 0.2 * jax.random.normal(jax.random.key(10 + i), flat[path].shape)
            flat[path] = flat[path] + noise
    params = unflatten(flat)
    _, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        2.0 + 3.0 * jax.random.normal(jax.random.key(1), (8, 16, 16, 3)),
        train=True, mutable=["batch_stats"],
    )
    return {"params": params, "batch_stats": updates["batch_stats"]}


@pytest.fixture(scope="module")
def mobilenet():
    model = kfor1.create("mobilenet_v2_035", num_classes=5, dropout_rate=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return model, variables


def make_batch(seed, num_classes, batch=4, size=16):
    """{"images": (K, B, size, size, 3), "labels": (K, B)}, labels within each task's classes."""
    key_images, key_labels = jax.random.split(jax.random.key(seed))
    k = len(num_classes)
    labels = jnp.stack([
        jax.random.randint(jax.random.fold_in(key_labels, i), (batch,), 0, n)
        for i, n in enumerate(num_classes)
    ])
    images = jax.random.normal(key_images, (k, batch, size, size, 3))
    return {"images": images, "labels": labels.astype(jnp.int32)}


def slice_batch(batch, idx):
    idx = np.asarray(idx)
    return {name: value[idx] for name, value in batch.items()}


def train(step, state, batches, seed=0):
    losses = []
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch, jax.random.key(seed + i))
        losses.append(metrics["loss"])
    return state, jnp.stack(losses)


def setup(variables, spec, tasks, tx=None, **kwargs):
    labels = partition(variables, spec)
    optimizer = patch_optimizer(tx or optax.adam(1e-2), labels, **kwargs)
    return optimizer, init_multitask(variables, labels, tasks, optimizer)


def split_flat(state):
    patch = state.layout.patch_paths()
    flat = flatten(state.params)
    return ({p: v for p, v in flat.items() if p in patch},
            {p: v for p, v in flat.items() if p not in patch})


def array_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


# --- frozen shared parameters ----------------------------------------------------------------


def test_frozen_backbone_mobilenet(mobilenet):
    """Adam, 3 steps: shared leaves are bitwise unchanged, every patch leaf of every task moves,
    and the optimiser keeps moments for patch leaves only."""
    model, variables = mobilenet
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state0 = setup(variables, "scale_bias+logits", tasks)
    step = make_train_step(model, optimizer, donate=False)
    batches = [make_batch(s, (5, 5), size=32) for s in range(3)]
    state, losses = train(step, state0, batches)
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


def test_fused_inference_equals_layer_by_layer_inference(mobilenet, monkeypatch):
    """On CPU, inference runs each block's expand BatchNorm + ReLU6, depthwise convolution and
    BatchNorm + ReLU6 as one compiled kernel; predictions (per task, with each task's own
    statistics after training) equal the layer-by-layer network's."""
    from kfor1.models import inverted_residual

    model, variables = mobilenet
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state = setup(variables, "scale_bias+logits", tasks)
    state, _ = train(make_train_step(model, optimizer, donate=False), state,
                     [make_batch(s, (5, 5), size=32) for s in range(2)])
    images = make_batch(7, (5, 5), batch=3, size=32)["images"]
    assert inverted_residual.fused_depthwise_available(jnp.float32, 3, "auto")
    fused = make_predict_fn(model)(state, images)
    monkeypatch.setattr(inverted_residual, "fused_depthwise_available", lambda *a: False)
    layer_by_layer = make_predict_fn(model)(state, images)
    chex.assert_trees_all_close(fused, layer_by_layer, atol=1e-5)
    assert not np.allclose(fused[0], fused[1], atol=1e-3)  # The tasks' patches differ.


# --- K tasks at once == K tasks alone --------------------------------------------------------


def test_k_tasks_equal_k_single_task_runs(tiny):
    classes = (5, 3, 5)
    tasks = [Task("a", 5), Task("b", 3), Task("c", 5)]
    _, state_k = setup(tiny, "scale_bias+logits", tasks)
    optimizer = patch_optimizer(optax.adam(1e-2), state_k.layout.labels)
    batches = [make_batch(s, classes) for s in range(3)]
    state_k, losses_k = train(
        make_train_step(TinyCNN(max(classes)), optimizer, donate=False), state_k, batches
    )
    chex.assert_shape(losses_k, (3, 3))
    assert np.all(np.isfinite(losses_k))

    for k, task in enumerate(tasks):
        opt1, state_1 = setup(tiny, "scale_bias+logits", [task])
        step_1 = make_train_step(TinyCNN(task.num_classes), opt1, donate=False)
        state_1, losses_1 = train(step_1, state_1, [slice_batch(b, [k]) for b in batches])
        chex.assert_trees_all_close(losses_1[:, 0], losses_k[:, k], **TOL)
        # Patches (head unpadded), shared weights and this task's BN statistics all agree.
        chex.assert_trees_all_close(task_variables(state_1, 0), task_variables(state_k, k), **TOL)
        chex.assert_shape(task_variables(state_k, k)["params"]["head"]["kernel"],
                          (16, task.num_classes))

    # Task-conditional BN: different data, different statistics.
    for path, value in flatten(state_k.batch_stats).items():
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert not np.allclose(value[i], value[j]), path


@pytest.mark.parametrize("train_shared", [False, True])
def test_tasks_in_chunks_equal_all_tasks_at_once(tiny, train_shared):
    """task_chunk=2 over 3 tasks (chunks of 2 and 1) computes the one-vmap step: patches, BN
    statistics, metrics and, when the backbone trains, the shared update summed over chunks."""
    tasks = [Task("a", 5), Task("b", 3), Task("c", 5)]
    kwargs = dict(shared_tx=optax.sgd(0.1)) if train_shared else {}
    optimizer, state0 = setup(tiny, "scale_bias+logits", tasks, **kwargs)
    batches = [make_batch(s, (5, 3, 5)) for s in range(2)]
    results = {}
    for chunk in (None, 2):
        step = make_train_step(TinyCNN(), optimizer, train_shared=train_shared, donate=False,
                               task_chunk=chunk)
        results[chunk] = train(step, state0, batches)
    (state_one, losses_one), (state_chunks, losses_chunks) = results[None], results[2]
    chex.assert_trees_all_close(losses_chunks, losses_one, **TOL)
    chex.assert_trees_all_close(state_chunks.params, state_one.params, **TOL)
    chex.assert_trees_all_close(state_chunks.batch_stats, state_one.batch_stats, **TOL)
    chex.assert_trees_all_close(state_chunks.opt_state, state_one.opt_state, **TOL)
    _, shared0 = split_flat(state0)
    _, shared = split_flat(state_chunks)
    assert any(not np.array_equal(shared[p], shared0[p]) for p in shared) == train_shared


def test_bad_task_chunk_is_rejected_when_the_step_is_built(tiny):
    optimizer, _ = setup(tiny, "logits", [Task("a", 5)])
    with pytest.raises(ValueError, match="task_chunk must be a positive int"):
        make_train_step(TinyCNN(), optimizer, task_chunk=0)


def test_identical_tasks_get_identical_patches(tiny):
    _, state = setup(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 5)])
    batch = make_batch(0, (5,))
    batch = {name: jnp.concatenate([v, v]) for name, v in batch.items()}
    optimizer = patch_optimizer(optax.adam(1e-2), state.layout.labels)
    state, _ = train(make_train_step(TinyCNN(), optimizer, donate=False), state, [batch] * 2)
    chex.assert_trees_all_close(task_variables(state, 0), task_variables(state, 1), **TOL)


# --- joint training of the shared backbone ---------------------------------------------------


def _merge(shared, patch):
    return unflatten({**shared, **patch})


def test_joint_training_shared_gradient_is_sum_of_task_gradients(tiny):
    """One sgd step with train_shared=True: shared -= lr * sum_k grad_k, and (with the BN layers
    shared) the shared statistics become the mean of what each task's batch says."""
    lr = 0.1
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state0 = setup(tiny, "logits", tasks, tx=optax.sgd(lr), shared_tx=optax.sgd(lr))
    batch = make_batch(3, (5, 5))
    step = make_train_step(TinyCNN(), optimizer, train_shared=True, donate=False)
    state, metrics = step(state0, batch, jax.random.key(0))

    model = TinyCNN()
    patch0, shared0 = split_flat(state0)

    def task_loss(shared, k):
        patch_k = {p: v[k] for p, v in patch0.items()}
        logits, updates = model.apply(
            {"params": _merge(shared, patch_k), "batch_stats": tiny["batch_stats"]},
            batch["images"][k], train=True, mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][k])
        return loss.mean(), updates["batch_stats"]

    grads, stats, losses = [], [], []
    for k in range(2):
        (loss, new_stats), grad = jax.value_and_grad(task_loss, has_aux=True)(shared0, k)
        grads.append(grad)
        stats.append(new_stats)
        losses.append(loss)
    total_grad = jax.tree.map(lambda a, b: a + b, *grads)
    expected = {p: v - lr * total_grad[p] for p, v in shared0.items()}
    _, shared = split_flat(state)
    assert shared.keys() == shared0.keys()
    chex.assert_trees_all_close(shared, expected, **TOL)
    for path in shared:
        assert not np.array_equal(shared[path], shared0[path]), f"shared {path} did not train"
    chex.assert_trees_all_close(metrics["loss"], jnp.stack(losses), **TOL)
    chex.assert_trees_all_close(
        state.batch_stats, jax.tree.map(lambda a, b: (a + b) / 2, *stats), **TOL
    )


def test_joint_training_identical_tasks_double_the_shared_update(tiny):
    lr = 0.05
    batch1 = make_batch(4, (5,))
    batch2 = {name: jnp.concatenate([v, v]) for name, v in batch1.items()}
    deltas, patches = [], []
    for tasks, batch in (([Task("a", 5)], batch1), ([Task("a", 5), Task("b", 5)], batch2)):
        optimizer, state0 = setup(tiny, "scale_bias+logits", tasks, tx=optax.sgd(lr),
                                  shared_tx=optax.sgd(lr))
        step = make_train_step(TinyCNN(), optimizer, train_shared=True, donate=False)
        state, _ = step(state0, batch, jax.random.key(0))
        _, shared0 = split_flat(state0)
        patch, shared = split_flat(state)
        deltas.append({p: shared[p] - shared0[p] for p in shared})
        patches.append(patch)
    chex.assert_trees_all_close(deltas[1], jax.tree.map(lambda d: 2 * d, deltas[0]), **TOL)
    assert all(np.abs(d).max() > 0 for d in deltas[0].values())
    # Each task's patch gets only its own gradient.
    chex.assert_trees_all_close(
        patches[1], jax.tree.map(lambda v: jnp.concatenate([v, v]), patches[0]), **TOL
    )


# --- per-group optimisers --------------------------------------------------------------------


def _grouped_run(variables, lr_scale_bias, lr_logits):
    labels = partition(variables, "scale_bias+logits", groups=True)
    optimizer = patch_optimizer(
        {"scale_bias": optax.sgd(lr_scale_bias), "logits": optax.sgd(lr_logits)}, labels
    )
    state0 = init_multitask(variables, labels, [Task("a", 5), Task("b", 5)], optimizer)
    step = make_train_step(TinyCNN(), optimizer, donate=False)
    state, _ = step(state0, make_batch(5, (5, 5)), jax.random.key(0))
    flat_labels = flatten(labels)
    flat0, flat = flatten(state0.params), flatten(state.params)
    return {
        group: {p: flat[p] - flat0[p] for p, lab in flat_labels.items() if lab == group}
        for group in ("scale_bias", "logits", SHARED)
    }


def test_per_group_learning_rates(tiny):
    base = _grouped_run(tiny, 0.1, 0.05)
    scaled = _grouped_run(tiny, 0.2, 0.15)
    assert len(base["scale_bias"]) == 6 and len(base["logits"]) == 2
    chex.assert_trees_all_close(scaled["scale_bias"],
                                jax.tree.map(lambda d: 2 * d, base["scale_bias"]), **TOL)
    chex.assert_trees_all_close(scaled["logits"],
                                jax.tree.map(lambda d: 3 * d, base["logits"]), **TOL)
    for deltas in (base, scaled):
        chex.assert_trees_all_equal(deltas[SHARED],
                                    jax.tree.map(jnp.zeros_like, deltas[SHARED]))
    # A zero learning rate freezes its group and only that group.
    frozen_head = _grouped_run(tiny, 0.1, 0.0)
    chex.assert_trees_all_equal(frozen_head["logits"],
                                jax.tree.map(jnp.zeros_like, frozen_head["logits"]))
    chex.assert_trees_all_close(frozen_head["scale_bias"], base["scale_bias"], **TOL)
    assert all(np.abs(d).max() > 0 for d in frozen_head["scale_bias"].values())


def test_per_group_optimizer_missing_group(tiny):
    labels = partition(tiny, "scale_bias+logits", groups=True)
    with pytest.raises(ValueError, match=r"no optimiser for patch group\(s\) \['logits'\]"):
        patch_optimizer({"scale_bias": optax.sgd(0.1)}, labels)


# --- heterogeneous heads ---------------------------------------------------------------------


@pytest.mark.parametrize("classes", [(10, 3), (10, 102)])
def test_heterogeneous_heads(classes):
    width = max(classes)
    base = TinyCNN(10)
    variables = base.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    tasks = [Task("ten", classes[0]), Task("other", classes[1])]
    optimizer, state = setup(variables, "scale_bias+logits", tasks)
    kernel = state.params["head"]["kernel"]
    chex.assert_shape(kernel, (2, 16, width))
    # The 10-class task starts from the pretrained head, the other from zeros; padding is zero.
    np.testing.assert_array_equal(kernel[0, :, :10], variables["params"]["head"]["kernel"])
    np.testing.assert_array_equal(kernel[1], 0)
    np.testing.assert_array_equal(kernel[0, :, 10:], 0)

    model = TinyCNN(width)
    step = make_train_step(model, optimizer, donate=False)
    state, losses = train(step, state, [make_batch(s, classes) for s in range(3)])
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


# --- resolution groups -----------------------------------------------------------------------


RES_TASKS = [Task("a", 5, resolution=16), Task("b", 5, resolution=24), Task("c", 5, 16)]


def _res_batches(seed):
    g16 = make_batch(seed, (5, 5), size=16)
    g24 = make_batch(seed + 100, (5,), size=24)
    return g16, g24


def test_resolution_groups_equal_groups_alone(tiny):
    optimizer, state = setup(tiny, "scale_bias+logits", RES_TASKS)
    batches = [_res_batches(s) for s in range(3)]
    step = make_train_step(TinyCNN(), optimizer, donate=False)
    state_all, losses = train(step, state, batches)
    chex.assert_shape(losses, (3, 3))

    explicit = make_train_step(TinyCNN(), optimizer, groups=[[0, 2], [1]], donate=False)
    state_explicit, losses_explicit = train(explicit, state, batches)
    chex.assert_trees_all_close(losses_explicit, losses, **TOL)
    chex.assert_trees_all_close(state_explicit.params, state_all.params, **TOL)

    for group, which in (([0, 2], 0), ([1], 1)):
        opt_g, state_g = setup(tiny, "scale_bias+logits", [RES_TASKS[i] for i in group])
        step_g = make_train_step(TinyCNN(), opt_g, donate=False)
        state_g, losses_g = train(step_g, state_g, [b[which] for b in batches])
        chex.assert_trees_all_close(losses_g, losses[:, np.asarray(group)], **TOL)
        for j, k in enumerate(group):
            chex.assert_trees_all_close(
                task_variables(state_g, j), task_variables(state_all, k), **TOL
            )


def test_resolution_group_errors(tiny):
    optimizer, state = setup(tiny, "scale_bias+logits", RES_TASKS)
    batch = _res_batches(0)
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match="has no tasks"):
        make_train_step(TinyCNN(), optimizer, groups=[[0, 2], [1], []])(state, batch, rng)
    with pytest.raises(ValueError, match="must cover each of the 3 task indices exactly once"):
        make_train_step(TinyCNN(), optimizer, groups=[[0], [1]])(state, batch, rng)
    with pytest.raises(ValueError, match="exactly once"):
        make_train_step(TinyCNN(), optimizer, groups=[[0, 1], [1, 2]])(state, batch, rng)
    with pytest.raises(ValueError, match="got 1 batches for 2 resolution groups"):
        make_train_step(TinyCNN(), optimizer)(state, batch[0], rng)
    with pytest.raises(ValueError, match="got 3 batches for 2 resolution groups"):
        make_train_step(TinyCNN(), optimizer)(state, (*batch, batch[0]), rng)


# --- compilation -----------------------------------------------------------------------------


def test_train_step_compiles_once(tiny):
    optimizer, state = setup(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
    step = make_train_step(TinyCNN(), optimizer, max_traces=1)  # donating, as in training
    for seed in range(4):
        state, metrics = step(state, make_batch(seed, (5, 3)), jax.random.key(seed))
    assert int(state.step) == 4
    assert np.all(np.isfinite(metrics["loss"]))
    with pytest.raises(AssertionError, match="traced > 1 times"):
        step(state, make_batch(9, (5, 3), size=20), jax.random.key(0))


def test_trace_guard_is_per_train_step(tiny):
    """Each make_train_step(max_traces=1) gets its own budget, even when built at one call site
    (a sweep, a restart, a parametrised test)."""
    for run in range(2):
        optimizer, state = setup(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
        step = make_train_step(TinyCNN(), optimizer, max_traces=1)
        for seed in range(2):
            state, _ = step(state, make_batch(seed, (5, 3)), jax.random.key(seed))
        assert int(state.step) == 2, run


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs(tiny):
    optimizer, state = setup(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
    step = make_train_step(TinyCNN(), optimizer, donate=False)
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match="K of the batch must equal K of the state"):
        step(state, make_batch(0, (5, 3, 3)), rng)
    with pytest.raises(ValueError, match=r"expected \(K=2, B, H, W, C\)"):
        step(state, {"images": jnp.zeros((2, 16, 16, 3)), "labels": jnp.zeros((2, 4), int)}, rng)
    bad_labels = make_batch(0, (5, 3))
    bad_labels["labels"] = bad_labels["labels"][:, :3]
    with pytest.raises(ValueError, match="do not match images"):
        step(state, bad_labels, rng)
    with pytest.raises(ValueError, match="needs 'images'"):
        step(state, {"labels": jnp.zeros((2, 4), int)}, rng)

    labels = partition(tiny, "scale_bias+logits")
    with pytest.raises(ValueError, match="task names must be unique"):
        init_multitask(tiny, labels, [Task("a", 5), ("a", 3)])
    with pytest.raises(ValueError, match="at least one task"):
        init_multitask(tiny, labels, [])
    with pytest.raises(ValueError, match="num_classes >= 1"):
        Task("empty", 0)
    with pytest.raises(ValueError, match="labels do not match the parameters"):
        init_multitask(tiny, {"head": labels["head"]}, [Task("a", 5)])
    shared_head = partition(tiny, "scale_bias")
    with pytest.raises(ValueError, match="add 'logits' to the patch spec"):
        init_multitask(tiny, shared_head, [Task("a", 5), Task("b", 3)])
    # A shared head is fine when every task has the head's class count.
    init_multitask(tiny, shared_head, [Task("a", 5), Task("b", 5)])

    with pytest.raises(KeyError, match="no task 'c'"):
        task_variables(state, "c")
    with pytest.raises(IndexError, match="out of range"):
        task_variables(state, 2)


# --- evaluation ------------------------------------------------------------------------------


def test_eval_step_counts_only_masked_in_examples(tiny):
    optimizer, state = setup(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
    state, _ = train(make_train_step(TinyCNN(), optimizer, donate=False), state,
                     [make_batch(s, (5, 3)) for s in range(2)])
    eval_step = make_eval_step(TinyCNN())
    batch = make_batch(7, (5, 3))
    mask = jnp.asarray([[True, True, False, False]] * 2)
    masked = eval_step(state, {**batch, "mask": mask})
    half = eval_step(state, {name: v[:, :2] for name, v in batch.items()})
    full = eval_step(state, batch)
    chex.assert_trees_all_close(masked["count"], jnp.asarray([2.0, 2.0]))
    chex.assert_trees_all_close(full["count"], jnp.asarray([4.0, 4.0]))
    chex.assert_trees_all_close(masked, half, **TOL)
    assert np.all(np.asarray(masked["correct"]) <= 2)
    # Eval uses each task's own variables: compare with the single-task model.
    for k, n in enumerate((5, 3)):
        logits = TinyCNN(n).apply(task_variables(state, k), batch["images"][k, :2])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][k, :2])
        correct = (jnp.argmax(logits, -1) == batch["labels"][k, :2]).sum()
        chex.assert_trees_all_close(masked["loss_sum"][k], loss.sum(), **TOL)
        assert float(masked["correct"][k]) == float(correct)
