"""A config resolved into a run: ``kfor1.trainer.experiment.setup`` checks what it can before it
loads anything, parses the patch spec once, and can leave the train splits closed."""

from __future__ import annotations

import pytest
from tiny_runs import run_config

from kfor1.patch.spec import PatchSpec
from kfor1.trainer import experiment


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("patch", "scale_bais", "unknown patch preset"),
        ("task_chunk", -3, "task_chunk=-3"),
        ("num_steps", 0, "is out of range: use an integer >= 1"),
        ("tasks", [], "config.tasks is empty"),
    ],
)
def test_config_mistakes_fail_before_the_base_loads(colours, monkeypatch, field, value,
                                                    message):
    def no_loading(config):
        raise AssertionError("the base was loaded before the config was checked")

    monkeypatch.setattr(experiment, "load_base", no_loading)
    config = run_config(colours)
    config[field] = value
    with pytest.raises(ValueError, match=message):
        experiment.setup(config)


def test_setup_holds_the_parsed_spec_and_every_task(colours):
    s = experiment.setup(run_config(colours, head="head/logits"))
    assert s.spec == PatchSpec(presets=("scale_bias", "logits"), head="head/logits")
    assert [t.task.name for t in s.tasks] == ["digits", "colours"]
    assert all(t.train is not None for t in s.tasks)
    assert {"scale_bias", "logits"} == set(s.schedules)
    assert s.eval_crop_fraction == 1.0  # run_config trains on padded whole images.


def test_eval_only_setup_leaves_train_splits_closed_and_checks_classes(colours):
    s = experiment.setup(run_config(colours), train=False,
                         class_names=[[str(d) for d in range(10)], ["blue", "green", "red"]])
    assert all(t.train is None for t in s.tasks)
    with pytest.raises(ValueError, match="run's classes"):
        experiment.setup(run_config(colours), train=False,
                         class_names=[[str(d) for d in range(10)], ["red", "green", "blue"]])


def test_a_patch_rule_that_matches_nothing_fails_before_any_data_is_read(colours, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the patch rules were checked")

    monkeypatch.setattr(experiment.kdata, "load_source", no_data)
    config = run_config(colours)
    config.patch_rules = [("head/.*", "patch:logits"), ("no/such/layer/.*", "patch"),
                          (".*", "shared")]
    with pytest.raises(ValueError, match="'no/such/layer/.\\*' matches no parameter"):
        experiment.setup(config)
