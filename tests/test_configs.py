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
