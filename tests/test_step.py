"""The multi-task step: K task patches trained in one compiled step, as if each were trained
alone; evaluation and prediction over the task axis.

Read as a specification of ``make_train_step``, ``make_eval_step`` and ``make_predict_fn``. Most
tests use the tiny CNN of ``tiny_models`` at 16 px; the fused-inference test uses the paper's
MobileNetV2 (width 0.35) at 32 px.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import (
    TOL,
    TinyCNN,
    build_state,
    make_batch,
    run_steps,
    slice_batch,
    split_flat,
)

from kfor1.multitask.state import Task, init_multitask, task_variables
from kfor1.multitask.step import (
    make_eval_step,
    make_predict_fn,
    make_train_step,
    smoothed_cross_entropy,
)
from kfor1.patch.optim import patch_optimizer
from kfor1.patch.spec import partition
from kfor1.tree import flatten, unflatten


def test_fused_inference_equals_layer_by_layer_inference(mobilenet, monkeypatch):
    """On CPU, inference runs each block's expand BatchNorm + ReLU6, depthwise convolution and
    BatchNorm + ReLU6 as one compiled kernel; predictions (per task, with each task's own
    statistics after training) equal the layer-by-layer network's."""
    from kfor1.models import inverted_residual

    model, variables = mobilenet
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state = build_state(variables, "scale_bias+logits", tasks)
    state, _ = run_steps(make_train_step(model, optimizer, donate=False), state,
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
    _, state_k = build_state(tiny, "scale_bias+logits", tasks)
    optimizer = patch_optimizer(optax.adam(1e-2), state_k.layout.labels)
    batches = [make_batch(s, classes) for s in range(3)]
    state_k, losses_k = run_steps(
        make_train_step(TinyCNN(max(classes)), optimizer, donate=False), state_k, batches
    )
    chex.assert_shape(losses_k, (3, 3))
    assert np.all(np.isfinite(losses_k))

    for k, task in enumerate(tasks):
        opt1, state_1 = build_state(tiny, "scale_bias+logits", [task])
        step_1 = make_train_step(TinyCNN(task.num_classes), opt1, donate=False)
        state_1, losses_1 = run_steps(step_1, state_1, [slice_batch(b, [k]) for b in batches])
        chex.assert_trees_all_close(losses_1[:, 0], losses_k[:, k], **TOL)
        # Patches (head unpadded), shared weights and this task's BN statistics all agree.
        chex.assert_trees_all_close(task_variables(state_1, 0), task_variables(state_k, k), **TOL)
        chex.assert_shape(task_variables(state_k, k)["params"]["head"]["kernel"],
                          (16, task.num_classes))

    # Task-conditional BN: different data, different statistics.
    for path, value in flatten(state_k.batch_stats).items():
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert not np.allclose(value[i], value[j]), path


def test_smoothed_cross_entropy_is_optax_smooth_labels_over_the_tasks_classes():
    logits = jax.random.normal(jax.random.key(0), (4, 5))
    labels = jnp.array([0, 2, 1, 2])
    full = smoothed_cross_entropy(logits, labels, jnp.ones(5, bool), 0.1)
    reference = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1))
    chex.assert_trees_all_close(full, reference, rtol=1e-6)
    # A 3-class task on a 5-wide padded head: the same as its own 3-wide head.
    padded = jnp.where(jnp.arange(5) < 3, logits, -1e9)
    chex.assert_trees_all_close(
        smoothed_cross_entropy(padded, labels, jnp.arange(5) < 3, 0.1),
        optax.softmax_cross_entropy(logits[:, :3],
                                    optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1)),
        rtol=1e-6)


def test_label_smoothing_trains_each_task_as_alone(tiny):
    """``label_smoothing`` (issue 31: it was never read) changes training, and K tasks of
    different class counts train as each would alone with a head of its own width."""
    classes = (5, 3)
    tasks = [Task("a", 5), Task("b", 3)]
    batches = [make_batch(s, classes) for s in range(2)]
    losses = {}
    for smoothing in (0.0, 0.2):
        opt, state = build_state(tiny, "scale_bias+logits", tasks)
        step = make_train_step(TinyCNN(5), opt, donate=False, label_smoothing=smoothing)
        losses[smoothing] = run_steps(step, state, batches)[1]
    assert not np.allclose(losses[0.0], losses[0.2])
    for k, task in enumerate(tasks):
        opt1, state_1 = build_state(tiny, "scale_bias+logits", [task])
        step_1 = make_train_step(TinyCNN(task.num_classes), opt1, donate=False,
                                 label_smoothing=0.2)
        _, losses_1 = run_steps(step_1, state_1, [slice_batch(b, [k]) for b in batches])
        chex.assert_trees_all_close(losses_1[:, 0], losses[0.2][:, k], **TOL)


@pytest.mark.parametrize("train_shared", [False, True])
def test_tasks_in_chunks_equal_all_tasks_at_once(tiny, train_shared):
    """task_chunk=2 over 3 tasks (chunks of 2 and 1) computes the one-vmap step: patches, BN
    statistics, metrics and, when the backbone trains, the shared update summed over chunks."""
    tasks = [Task("a", 5), Task("b", 3), Task("c", 5)]
    kwargs = dict(shared_tx=optax.sgd(0.1)) if train_shared else {}
    optimizer, state0 = build_state(tiny, "scale_bias+logits", tasks, **kwargs)
    batches = [make_batch(s, (5, 3, 5)) for s in range(2)]
    results = {}
    for chunk in (None, 2):
        step = make_train_step(TinyCNN(), optimizer, train_shared=train_shared, donate=False,
                               task_chunk=chunk)
        results[chunk] = run_steps(step, state0, batches)
    (state_one, losses_one), (state_chunks, losses_chunks) = results[None], results[2]
    chex.assert_trees_all_close(losses_chunks, losses_one, **TOL)
    chex.assert_trees_all_close(state_chunks.params, state_one.params, **TOL)
    chex.assert_trees_all_close(state_chunks.batch_stats, state_one.batch_stats, **TOL)
    chex.assert_trees_all_close(state_chunks.opt_state, state_one.opt_state, **TOL)
    _, shared0 = split_flat(state0)
    _, shared = split_flat(state_chunks)
    assert any(not np.array_equal(shared[p], shared0[p]) for p in shared) == train_shared


def test_bad_task_chunk_is_rejected_when_the_step_is_built(tiny):
    optimizer, _ = build_state(tiny, "logits", [Task("a", 5)])
    with pytest.raises(ValueError, match="task_chunk must be a positive int"):
        make_train_step(TinyCNN(), optimizer, task_chunk=0)


# --- joint training of the shared backbone ---------------------------------------------------


def _merge(shared, patch):
    return unflatten({**shared, **patch})


def test_joint_training_shared_gradient_is_sum_of_task_gradients(tiny):
    """One sgd step with train_shared=True: shared -= lr * sum_k grad_k, and (with the BN layers
    shared) the shared statistics become the mean of what each task's batch says."""
    lr = 0.1
    tasks = [Task("a", 5), Task("b", 5)]
    optimizer, state0 = build_state(tiny, "logits", tasks, tx=optax.sgd(lr),
                                    shared_tx=optax.sgd(lr))
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
        optimizer, state0 = build_state(tiny, "scale_bias+logits", tasks, tx=optax.sgd(lr),
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


# --- resolution groups -----------------------------------------------------------------------


RES_TASKS = [Task("a", 5, resolution=16), Task("b", 5, resolution=24), Task("c", 5, 16)]


def _res_batches(seed):
    g16 = make_batch(seed, (5, 5), size=16)
    g24 = make_batch(seed + 100, (5,), size=24)
    return g16, g24


def test_resolution_groups_equal_groups_alone(tiny):
    optimizer, state = build_state(tiny, "scale_bias+logits", RES_TASKS)
    batches = [_res_batches(s) for s in range(3)]
    step = make_train_step(TinyCNN(), optimizer, donate=False)
    state_all, losses = run_steps(step, state, batches)
    chex.assert_shape(losses, (3, 3))

    explicit = make_train_step(TinyCNN(), optimizer, groups=[[0, 2], [1]], donate=False)
    state_explicit, losses_explicit = run_steps(explicit, state, batches)
    chex.assert_trees_all_close(losses_explicit, losses, **TOL)
    chex.assert_trees_all_close(state_explicit.params, state_all.params, **TOL)

    for group, which in (([0, 2], 0), ([1], 1)):
        opt_g, state_g = build_state(tiny, "scale_bias+logits", [RES_TASKS[i] for i in group])
        step_g = make_train_step(TinyCNN(), opt_g, donate=False)
        state_g, losses_g = run_steps(step_g, state_g, [b[which] for b in batches])
        chex.assert_trees_all_close(losses_g, losses[:, np.asarray(group)], **TOL)
        for j, k in enumerate(group):
            chex.assert_trees_all_close(
                task_variables(state_g, j), task_variables(state_all, k), **TOL
            )


def test_resolution_group_errors(tiny):
    optimizer, state = build_state(tiny, "scale_bias+logits", RES_TASKS)
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
    optimizer, state = build_state(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
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
        optimizer, state = build_state(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
        step = make_train_step(TinyCNN(), optimizer, max_traces=1)
        for seed in range(2):
            state, _ = step(state, make_batch(seed, (5, 3)), jax.random.key(seed))
        assert int(state.step) == 2, run


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs(tiny):
    optimizer, state = build_state(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
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
    optimizer, state = build_state(tiny, "scale_bias+logits", [Task("a", 5), Task("b", 3)])
    state, _ = run_steps(make_train_step(TinyCNN(), optimizer, donate=False), state,
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


class _OwnedOnBatchStatistics(TinyCNN):
    """TinyCNN as a patch that owns only ``owned``'s statistics must train it: that layer on
    batch statistics, the others on the base's running statistics."""

    owned: str = "stem_bn"

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(name):
            return nn.BatchNorm(use_running_average=name != self.owned, momentum=0.9, name=name)
        x = nn.Conv(self.channels, (3, 3), strides=2, use_bias=False, name="stem")(x)
        x = nn.relu(bn("stem_bn")(x))
        x = nn.Conv(self.channels, (3, 3), feature_group_count=self.channels, use_bias=False,
                    name="dw")(x)
        x = nn.relu(bn("dw_bn")(x))
        x = nn.Conv(16, (1, 1), name="pw")(x)
        x = nn.relu(bn("pw_bn")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("owned", ["stem_bn", "pw_bn"])
@pytest.mark.parametrize("step_kind", ["train", "stats"])
def test_a_partial_statistics_patch_trains_the_network_it_ships(tiny, step_kind, owned):
    """Issue 36: a patch that owns some BatchNorm statistics and trains below the head ran
    every BatchNorm on batch statistics, so layers whose statistics stay the base's were
    trained on statistics that evaluation never uses (``input_stats+depthwise+logits``: 10% on
    digits). Each layer now runs as its statistics' owner implies, in the train and the
    statistics steps; the base's statistics are left as they were."""
    from kfor1.multitask.step import make_stats_step

    rules = [("head/.*", "patch:logits"), ("dw/kernel", "patch:depthwise"),
             (f"{owned}/.*", "patch:stats"), (".*", "shared")]
    optimizer, state = build_state(tiny, rules, [Task("a", 5)], tx=optax.sgd(0.0))
    batch = make_batch(0, (5,))
    reference = _OwnedOnBatchStatistics(5, owned=owned)
    logits, updates = reference.apply(task_variables(state, 0), batch["images"][0],
                                      mutable=["batch_stats"])
    expected_stats = flatten(updates["batch_stats"])
    if step_kind == "train":
        step = make_train_step(TinyCNN(5), optimizer, donate=False)
        new_state, metrics = step(state, batch, jax.random.key(0))
        expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][0])
        np.testing.assert_allclose(metrics["loss"][0], expected.mean(), rtol=1e-5)
        new_stats = {p: v[0] if v.ndim == 2 and p.startswith(owned) else v
                     for p, v in flatten(new_state.batch_stats).items()}
        np.testing.assert_allclose(new_stats[f"{owned}/mean"], expected_stats[f"{owned}/mean"],
                                   rtol=1e-5, atol=1e-6)
    else:
        stats = make_stats_step(TinyCNN(5))(state, batch, jax.random.key(0))
        assert set(stats) == {f"{owned}/mean", f"{owned}/var"}
        # The statistics step returns the batch's own: the momentum-0.9 update's target.
        old = flatten(state.batch_stats)[f"{owned}/mean"][0]
        np.testing.assert_allclose(0.9 * old + 0.1 * stats[f"{owned}/mean"][0],
                                   expected_stats[f"{owned}/mean"], rtol=1e-4, atol=1e-6)
        new_stats = {**flatten(state.batch_stats), **stats}
    old = flatten(state.batch_stats)
    base_layers = {"stem_bn", "dw_bn", "pw_bn"} - {owned}
    for path in (f"{layer}/{s}" for layer in base_layers for s in ("mean", "var")):
        np.testing.assert_array_equal(new_stats[path], old[path])
