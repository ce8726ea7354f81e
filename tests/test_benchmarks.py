"""The benchmark scripts run end to end (``--tiny``); their timings are not checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_impl_tiny(tmp_path, capsys):
    script = load_script("conv_impl")
    out_json = tmp_path / "results.json"
    assert script.main(["--tiny", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ")
    header = next(line for line in out.splitlines() if line.startswith("| efficientnet_lite0"))
    assert "xla (img/s)" in header and "fast_cpu (img/s)" in header and "speedup" in header
    assert any(line.startswith("| inference |") for line in out.splitlines())
    assert any(line.startswith("| train step |") for line in out.splitlines())
    results = json.loads(out_json.read_text())
    for workload in ("inference", "train step"):
        for impl in ("xla", "fast_cpu"):
            assert results["timings"][workload][impl]["images_per_s"] > 0
