"""The config files: the paper's experiments default to the paper's base (MobileNetV2 1.0 with
ImageNet weights), the quickstart and transfer configs to EfficientNet-Lite0; ``model=``
overrides either."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _get_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


PAPER = sorted(p.stem for p in CONFIGS.glob("paper_*.py"))


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_use_the_papers_base(name):
    assert _get_config(name).model == "mobilenet_v2"
    assert _get_config(name, "model=efficientnet_lite0").model == "efficientnet_lite0"


@pytest.mark.parametrize("name, arg", [("quickstart", None), ("transfer", "dataset=digits")])
def test_small_configs_keep_lite0(name, arg):
    assert _get_config(name, arg).model == "efficientnet_lite0"


def test_there_are_paper_configs():
    assert len(PAPER) >= 7


def test_every_config_field_has_a_range_and_each_range_refuses():
    """``kfor1.trainer.config_ranges``: one table of allowed values for every field (issue 31:
    a negative learning rate, dropout 1.0, bn_momentum 1.5 and negative warm-up trained to
    chance with exit status 0)."""
    import pytest

    from kfor1.trainer.config import ConfigError, base_config
    from kfor1.trainer.config_ranges import allowed, check_ranges, leaves

    config = base_config()
    missing = [path for path, _ in leaves(config) if allowed(path) is None]
    assert not missing, f"fields without a range in config_ranges.ALLOWED: {missing}"
    check_ranges(config)
    for path, bad, text in [
        ("learning_rate.scale_bias", -1e-2, "> 0"), ("dropout_rate", 1.0, "[0, 1)"),
        ("bn_momentum", 1.5, "[0, 1), or < 0"), ("warmup_steps", -5, "an integer >= 0"),
        ("label_smoothing", 1.5, "[0, 1)"), ("momentum", 1.0, "[0, 1)"),
        ("weight_decay", -0.1, ">= 0"), ("optimizer", "lamb", "one of adamw, adam, sgd"),
        ("augment.min_scale", 0.0, "(0, 1]"), ("seed", -1, "an integer >= 0"),
        ("mesh.tasks", 0, "an integer >= 1"), ("learning_rate.logits", float("nan"), "> 0"),
    ]:
        c = base_config()
        group, _, leaf = path.rpartition(".")
        (c[group] if group else c)[leaf] = bad
        with pytest.raises(ConfigError, match=f"config.{path}={bad!r} is out of range: use "
                           + text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            check_ranges(c)
    c = base_config()
    c.dropout_rate, c.bn_momentum = -1.0, -1.0  # The model's own.
    check_ranges(c)
