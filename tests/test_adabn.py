"""The ``stats`` patch (AdaBN): kfor1/adabn.py, ``make_stats_step`` and the ``stats`` preset in
kfor1/spec.py. Statistics are each task's own, estimated exactly before training, untouched by
training, carried by the patch file, resumed, and a warm start of ``scale_bias``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfor1 import data as kdata
from kfor1.adabn import reestimate_stats
from kfor1.config import base_config, task
from kfor1.experiment import setup
from kfor1.multitask import task_variables
from kfor1.patchfile import load_patch, load_patched, start_from_patch
from kfor1.spec import PATCH, SHARED, partition, stats_labels
from kfor1.train import train
from kfor1.tree import flatten


def _config(**overrides):
    c = base_config()
    c.model = "tests.user_model:factory"
    c.patch = "stats+logits"
    c.tasks = [task("digits", resolution=32)]
    c.num_steps, c.batch_size, c.warmup_steps = 6, 8, 1
    c.log_every, c.checkpoint_every, c.eval_batch_size = 2, 2, 48
    c.progress, c.augment.crop = False, "pad"
    for key, value in overrides.items():
        c[key] = value
    return c


def _train_images(s, n: int) -> np.ndarray:
    pre = s.base.preprocessing
    batch = next(kdata.eval_batches(s.tasks[0].train.take(n), resolution=32, mean=pre.mean,
                                    std=pre.std, batch_size=n,
                                    crop_fraction=s.eval_crop_fraction))
    return batch["images"]


def _batch_stats(s, variables, images) -> dict:
    """Flax's own batch statistics of ``images`` at every BN layer: BatchNorm updates
    ``new = m * old + (1 - m) * batch``, so from zeros, with the user model's m = 0.9."""
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, updates = s.model.clone(num_classes=10).apply(
        {"params": variables["params"], "batch_stats": zeros}, images, train=True,
        mutable=["batch_stats"])
    return {p: np.asarray(v) / 0.1 for p, v in flatten(updates["batch_stats"]).items()}


def test_the_stats_preset_owns_every_bn_statistic_and_no_parameter(tiny):
    labels = partition(tiny, "stats")
    assert set(flatten(labels).values()) == {SHARED}
    owned = flatten(stats_labels(tiny["batch_stats"], labels, "stats"))
    assert owned and set(owned.values()) == {PATCH}
    head_only = partition(tiny, "stats+logits")
    assert set(flatten(stats_labels(tiny["batch_stats"], head_only)).values()) == {SHARED}


def test_one_batch_gives_exactly_the_statistics_of_that_batch():
    s = setup(_config())
    state = s.init_state()
    new = reestimate_stats(s, state, images=48)
    expected = _batch_stats(s, task_variables(state, 0), _train_images(s, 48))
    got = flatten(task_variables(new, 0)["batch_stats"])
    assert set(got) == set(expected)
    for path in got:
        np.testing.assert_allclose(got[path], expected[path], rtol=2e-4, atol=1e-5)


def test_batches_pool_to_the_statistics_of_all_images():
    # The first BN layer's input does not depend on any statistics: two batches of 48 must
    # give the mean and variance of all 96 images, as one batch of 96 does.
    s = setup(_config())
    state = s.init_state()
    got = flatten(task_variables(reestimate_stats(s, state, images=96), 0)["batch_stats"])
    expected = _batch_stats(s, task_variables(state, 0), _train_images(s, 96))
    for leaf in ("mean", "var"):
        path = f"features_norm/{leaf}"
        np.testing.assert_allclose(got[path], expected[path], rtol=2e-4, atol=1e-5)


def test_training_keeps_the_estimated_statistics_and_the_backbone(tmp_path):
    s = setup(_config())
    estimated = flatten(task_variables(reestimate_stats(s, s.init_state()), 0)["batch_stats"])
    summary = train(_config(), str(tmp_path / "run"))
    trained = load_patched(summary["tasks"]["digits"]["patch_dir"])
    stats = flatten(trained.variables["batch_stats"])
    base = flatten(s.base.variables["batch_stats"])
    for path, value in estimated.items():
        np.testing.assert_allclose(stats[path], value, rtol=1e-6)
        assert not np.allclose(stats[path], base[path])  # The task's own, not the base's.
    params, base_params = flatten(trained.variables["params"]), flatten(s.base.variables["params"])
    for path, value in params.items():
        if not path.startswith("classifier/"):
            np.testing.assert_array_equal(value, base_params[path])
    assert summary["tasks"]["digits"]["patch_statistics"] == sum(v.size for v in stats.values())


def test_a_resumed_stats_run_ends_as_an_uninterrupted_one(tmp_path):
    whole = train(_config(), str(tmp_path / "whole"))
    assert train(_config(), str(tmp_path / "parts"), stop_at_step=2) == {"stopped_at_step": 2}
    resumed = train(_config(), str(tmp_path / "parts"))
    assert resumed["tasks"]["digits"]["accuracy"] == whole["tasks"]["digits"]["accuracy"]
    a = load_patched(whole["tasks"]["digits"]["patch_dir"]).variables
    b = load_patched(resumed["tasks"]["digits"]["patch_dir"]).variables
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_stats_patch_warm_starts_scale_bias(tmp_path):
    stats_run = train(_config(num_steps=2), str(tmp_path / "stats"))
    patch = load_patch(stats_run["tasks"]["digits"]["patch_dir"])
    s = setup(_config(patch="scale_bias+logits"))
    state, notes = start_from_patch(s.init_state(), 0, patch, s.base.variables)
    got = flatten(task_variables(state, 0)["batch_stats"])
    for path, value in flatten(patch.variables["batch_stats"]).items():
        np.testing.assert_array_equal(got[path], value)


@pytest.mark.parametrize("value", [0, -5])
def test_stats_images_must_be_positive(value):
    from kfor1.config import ConfigError
    from kfor1.experiment import check_values

    with pytest.raises(ConfigError, match="config.stats_images"):
        check_values(_config(stats_images=value))
