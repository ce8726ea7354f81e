"""The patch optimiser: per-group transforms, frozen shared leaves, every group covered.

Read as a specification of ``kfor1.patch.optim`` (``patch_optimizer`` and ``build_optimizer``).
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
    make_batch,
)

from kfor1.multitask.state import Task, init_multitask
from kfor1.multitask.step import make_train_step
from kfor1.patch.optim import build_optimizer, patch_optimizer
from kfor1.patch.spec import SHARED, partition
from kfor1.trainer.config import base_config
from kfor1.tree import flatten

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


# --- from a config ---------------------------------------------------------------------------


def _labels():
    return {"stem": {"kernel": SHARED}, "bn": {"scale": "scale_bias", "bias": "scale_bias"},
            "head": {"kernel": "logits", "bias": "logits"}}


def test_every_config_file_builds_its_optimizer():
    import importlib.util
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(None)
        assert config.tasks and config.num_steps > 0, path.name
        tx, schedules = build_optimizer(config, _labels())
        assert set(schedules) == {"scale_bias", "logits"} | (
            {SHARED} if config.train_shared else set()), path.name


def test_config_learning_rates_reach_each_group_and_shared_stays_frozen():
    """One sgd step from the config: each group moves by its own rate; shared leaves get a zero
    update and no optimiser state."""
    config = base_config()
    config.optimizer, config.schedule, config.warmup_steps = "sgd", "constant", 0
    config.momentum = 0.0
    config.learning_rate.scale_bias, config.learning_rate.logits = 0.5, 0.25
    tx, schedules = build_optimizer(config, _labels())
    assert schedules["scale_bias"](0) == 0.5 and schedules["logits"](7) == 0.25
    params = jax.tree.map(lambda _: jnp.ones(3), _labels())
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert float(updates["bn"]["scale"][0]) == -0.5
    assert float(updates["head"]["bias"][0]) == -0.25
    assert float(jnp.abs(updates["stem"]["kernel"]).max()) == 0.0
    # sgd's momentum trace exists for the four patch leaves only.
    assert len([x for x in jax.tree.leaves(state) if np.shape(x) == (3,)]) == 4


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optimizer", "adagrad", "use adamw, adam or sgd"),
        ("schedule", "step", "use cosine, constant or onecycle"),
    ],
)
def test_bad_optimizer_settings_name_the_choices(field, value, message):
    config = base_config()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        build_optimizer(config, _labels())


def test_a_group_without_a_learning_rate_is_named_with_the_flag_to_add():
    config = base_config()
    with config.unlocked():
        del config.learning_rate["logits"]
    with pytest.raises(ValueError, match=r"no entry for \['logits'\].*learning_rate.logits="):
        build_optimizer(config, _labels())
    config = base_config()
    config.train_shared = True
    with config.unlocked():
        del config.learning_rate["shared"]
    with pytest.raises(ValueError, match=r"no entry for \['shared'\]"):
        build_optimizer(config, _labels())
