"""The benchmark scripts run end to end (``--tiny``); their timings are not checked."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# The scripts run as modules from the repository root (``python -m benchmarks.suite``).
if str(BENCHMARKS.parent) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS.parent))


def test_conv_impl_tiny(tmp_path, capsys):
    script = importlib.import_module("benchmarks.suite.conv_impl")
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


def test_suite_tiny(tmp_path, capsys):
    """Every section of ``benchmarks/suite/grid.py`` runs (32 px, batch 2, K=1,2, one repetition,
    unoptimised XLA), and its PyTorch reference computes kfor1's network: exact mode matches
    kfor1's logits on the real packaged weights, the fast (symmetric padding) mode does not."""
    suite = importlib.import_module("benchmarks.suite.grid")
    out_json = tmp_path / "suite.json"
    assert suite.main(["--tiny", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("jax device: ") and "load average" in out
    results = json.loads(out_json.read_text())
    [cell] = results["cells"]
    assert set(cell["sections"]) == set(suite.SECTIONS)
    for name in suite.SECTIONS:
        assert f"(`{name}`)" in out, name
    checks = cell["checks"]
    assert checks["torch_exact_max_abs_diff"] < 1e-3
    assert checks["torch_fast_max_abs_diff"] > 10 * checks["torch_exact_max_abs_diff"]
    sections = cell["sections"]
    assert sections["patch_step"]["ratio"] > 0 and sections["inference"]["ratio"] > 0
    assert sections["full_step"]["patch_vs_full"] > 0
    assert sorted(int(k) for k in sections["k_tasks"]["by_k"]) == [1, 2]
    files = sections["patch_files"]["presets"]
    assert set(files) == set(suite.PRESETS)
    assert files["logits"]["weights_bytes"] < files["scale_bias+logits"]["weights_bytes"] < (
        files["full"]["weights_bytes"])
    for path in ("inference", "patch step", "full step"):
        for entry in sections["flops"]["paths"][path].values():
            assert entry["model_flops"] > 0 and entry["model_gflops_per_s"] > 0
    assert sections["flops"]["matmul_peak"]["jnp.dot"]["gflops"] > 0


def test_suite_tiny_grid_on_the_papers_base(tmp_path, capfd):
    """``--model mobilenet_v2 --precision float32,bfloat16``: a grid of two cells. torchvision's
    network (padding inside the convolutions is its exact definition) computes kfor1's on the
    packaged ImageNet checkpoint; both precisions train and infer, each cell in a process of its
    own; the summary has a row per cell."""
    suite = importlib.import_module("benchmarks.suite.grid")
    out_json = tmp_path / "suite.json"
    assert suite.main(["--tiny", "--model", "mobilenet_v2", "--precision", "float32,bfloat16",
                       "--only", "patch_step,inference", "--json", str(out_json)]) == 0
    out = capfd.readouterr().out  # The cells ran in processes of their own.
    assert "mobilenet_v2, 32 px, batch 2, float32" in out and "torchvision's own" in out
    assert "mobilenet_v2, 32 px, batch 2, bfloat16" in out
    results = json.loads(out_json.read_text())
    assert [c["config"]["precision"] for c in results["cells"]] == ["float32", "bfloat16"]
    for cell in results["cells"]:
        assert cell["checks"]["torch_exact_max_abs_diff"] < 1e-3
        assert cell["checks"]["torch_fast_max_abs_diff"] < 1e-3
        timings = cell["sections"]["inference"]["timings"]
        assert sum(name.startswith("torch") for name in timings) == 1  # Exact and fast: one.
        assert cell["sections"]["patch_step"]["ratio"] > 0
    summary = results["summary"].splitlines()
    assert len(summary) == 4 and summary[2].startswith("| mobilenet_v2 | 32 | 2 | float32 |")
    assert "# Summary" in out and results["summary"] in out


def test_suite_refuses_bad_grids(capsys):
    suite = importlib.import_module("benchmarks.suite.grid")
    for argv, message in ((["--model", "resnet"], "--model"), (["--precision", "fp8"], "fp8"),
                          (["--ks", "2,4"], "--ks must start with 1"),
                          (["--batch", "0"], "must be positive")):
        try:
            suite.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(argv)
        assert message in capsys.readouterr().err, argv


def test_serve_benchmark_tiny(tmp_path, capsys):
    """``python -m benchmarks.serving --tiny``: the mixed-task call, the single-task model, K
    models run per group, table memory and ``add``, for K = 1 and 4 (its numbers mean nothing)."""
    serve = importlib.import_module("benchmarks.serving.mixed_batch")
    out_json = tmp_path / "serve.json"
    assert serve.main(["--tiny", "--specs", "scale_bias+logits", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["k"], r["batch"]) for r in rows] == [(1, 8), (4, 8)]
    for r in rows:
        assert r["mixed_images_per_s"] > 0 and r["single_images_per_s"] > 0
        assert r["compiled_variants"] == 1  # add/remove in the timing never recompiled.
        assert r["table_bytes"] < r["k_full_models_bytes"]
    assert "mixed / single" in capsys.readouterr().out


def test_fault_matrix_counts_and_its_checks(tmp_path):
    """The fault matrix's bookkeeping (its runs take ~15 minutes, so they are not run here;
    the table they print is in benchmarks/README.md): what counts as a clean error, and the
    totals it prints."""
    script = importlib.import_module("benchmarks.faults.matrix")
    assert script.one_line_error(2, "error: SIGTERM received: stopped after step 5\n")
    assert script.one_line_error(2, "note: took it over\nerror: something\n")
    assert not script.one_line_error(1, "error: x\n")
    assert not script.one_line_error(2, "Traceback (most recent call last):\nerror: x\n")
    assert not script.one_line_error(2, "error: x\nerror: y\n")
    outcomes = [
        {"clean_error": True, "exact_resume": True, "silent": False, "lost": False},
        {"clean_error": False, "exact_resume": True, "silent": False, "lost": False},
        {"clean_error": True, "exact_resume": False, "silent": True, "lost": True},
    ]
    assert script.counts(outcomes) == {"cases": 3, "clean errors": 2, "exact resumes": 2,
                                       "silent results": 1, "files lost": 1}
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
    (tmp_path / "checkpoints.corrupt" / "9-1700000000").mkdir(parents=True)
    assert script.checkpoints(tmp_path) == {"3"} and script.moved_aside(tmp_path) == {"9"}
    data = tmp_path / "f.bin"
    data.write_bytes(bytes(300))
    script.flip(data)
    assert sum(b == 0xFF for b in data.read_bytes()) == 64
    try:
        script.main(["--cases", "nope"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown case must be refused")


def test_device_check_on_the_cpu(tmp_path, capsys):
    """``benchmarks/device/check.py`` (the GPU script's first stage) refuses the CPU unless
    told, and with ``--allow-cpu`` runs its checks here: the CPU-only paths are on (as expected
    on a CPU), the compiled steps call kfor1's CPU kernels, and a K = 3 step with three class
    counts equals three single-task steps.

    The bound here is 1e-4, not the script's default 1e-5 (the issue's bound on a GPU): on the
    CPU the K-task and single-task steps reduce in different orders, and the float32 rounding
    left depends on the processor (3.9e-6 on one machine, 1.3e-5 on another). Tasks that mixed
    (a wrong slice, a shared statistic) would differ by orders of magnitude more.
    """
    check = importlib.import_module("benchmarks.device.check")
    assert check.main([]) == 2
    assert "this check is for a GPU or TPU" in capsys.readouterr().err
    out_json = tmp_path / "check.json"
    assert check.main(["--allow-cpu", "--resolution", "64", "--specs", "scale_bias+logits",
                       "--precisions", "float32", "--tol", "1e-4", "--json", str(out_json)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("device check: passed")
    results = json.loads(out_json.read_text())
    assert results["cpu_paths"]["ok"] and results["failures"] == []
    found = results["scale_bias+logits at float32 precision"]
    assert max(found["errors"].values()) <= 1e-4
    assert "kfor1_depthwise_conv" in found["kernel_calls"]


def test_end_to_end_tiny(tmp_path, capsys):
    """``benchmarks/suite/end_to_end.py --tiny``: the trainer on digits, its step and its input
    pipeline alone, and the table with their ratio (its numbers mean nothing)."""
    e2e = importlib.import_module("benchmarks.suite.end_to_end")
    out_json = tmp_path / "e2e.json"
    assert e2e.main(["--tiny", "--cache", "--json", str(out_json)]) == 0
    [row] = json.loads(out_json.read_text())
    assert row["resolution"] == 32 and len(row["logged_rates"]) == 2
    assert row["trainer_images_per_s"] > 0 and row["step_alone_images_per_s"] > 0
    assert row["input_alone_images_per_s"] > 0 and row["ratio"] > 0
    assert row["cached_input_images_per_s"] > 0 and row["cache_fill_s"] > 0
    assert "| 32 |" in capsys.readouterr().out


def test_profile_tiny(tmp_path, capsys):
    """``benchmarks/profiles/hlo.py --tiny``: every path's ops are found in the profiler's trace and
    sorted into kinds (its numbers mean nothing)."""
    profile = importlib.import_module("benchmarks.profiles.hlo")
    out_json = tmp_path / "profile.json"
    assert profile.main(["--tiny", "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())["results"]
    assert [r["path"] for r in results] == ["inference", "patch step", "full step"]
    for r in results:
        assert r["ops_seen"] > 10 and r["op_us_per_step"] > 0
        assert r["by_kind_us"]["matrix products"] > 0 and r["by_kind_us"]["depthwise"] > 0
    torch_results = json.loads(out_json.read_text())["torch_results"]
    assert [r["path"] for r in torch_results] == ["inference", "patch step", "full step"]
    for r in torch_results:  # PyTorch's same paths, sorted into the same kinds.
        kinds = r["by_kind_us"]
        assert kinds["matrix products"] > 0 and kinds["depthwise"] > 0
        assert kinds["BatchNorm sums"] > 0 and kinds["elementwise"] > 0
    out = capsys.readouterr().out
    assert "| inference |" in out and "kfor1 / PyTorch, op ms per step by kind" in out


def test_profile_sorts_torch_ops():
    """PyTorch's ops go to the kinds of kfor1's HLO; a depthwise kernel is (C, 1, k, k)."""
    kind = importlib.import_module("benchmarks.profiles.torch_ops").torch_kind
    depthwise, pointwise = [[8, 96, 64, 64], [96, 1, 3, 3]], [[8, 16, 64, 64], [96, 16, 1, 1]]
    assert kind("aten::mkldnn_convolution", depthwise) == "depthwise"
    assert kind("aten::convolution_backward", [[8, 96, 64, 64], *depthwise]) == "depthwise"
    assert kind("aten::mkldnn_convolution", pointwise) == "matrix products"
    assert kind("aten::convolution_backward", [[8, 96, 64, 64], *pointwise]) == "matrix products"
    assert kind("aten::addmm", [[10], [8, 1280], [1280, 10]]) == "matrix products"
    assert kind("aten::native_batch_norm_backward", []) == "BatchNorm sums"
    assert kind("aten::hardtanh_", []) == "elementwise"
    assert kind("aten::_fused_adamw_", []) == "elementwise"
    assert kind("aten::copy_", []) == "data movement"
    assert kind("aten::empty", []) == "other"


def test_profile_classifies_hlo():
    profile = importlib.import_module("benchmarks.profiles.hlo")
    hlo = "\n".join([
        "%fused_add (p: f32[8]) -> f32[8] {",
        "  %p = f32[8]{0} parameter(0)",
        "  ROOT %add.0 = f32[8]{0} add(f32[8]{0} %p, f32[8]{0} %p)",
        "}",
        "%fused_reduce (p: f32[8]) -> f32[] {",
        "  ROOT %reduce.0 = f32[] reduce(f32[8]{0} %p, f32[] %c), dimensions={0}",
        "}",
        "%fused_dot (a: f32[8,4], b: f32[4,16]) -> f32[8,16] {",
        "  ROOT %dot.0 = f32[8,16]{1,0} dot(f32[8,4]{1,0} %a, f32[4,16]{1,0} %b)",
        "}",
        "%fused_copy (p: f32[8,4]) -> f32[4,8] {",
        "  %p = f32[8,4]{1,0} parameter(0)",
        "  ROOT %copy.0 = f32[4,8]{0,1} copy(f32[8,4]{1,0} %p)",
        "}",
        "ENTRY %main (x: f32[8]) -> (f32[8]) {",
        '  %dot.1 = f32[8,16]{1,0} dot(f32[8,4]{1,0} %a, f32[4,16]{1,0} %b)',
        '  %custom-call.2 = f32[8]{0} custom-call(%x), custom_call_target="kfor1_channel_sums"',
        '  %custom-call.3 = f32[8]{0} custom-call(%x), custom_call_target="kfor1_depthwise_conv"',
        '  %fusion.4 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_add',
        '  %fusion.5 = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce',
        '  %copy.6 = f32[8,4]{0,1} copy(%a)',
        '  %ynn_fusion.8 = f32[8,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot',
        '  %copy_fusion.9 = f32[4,8]{0,1} fusion(%a), kind=kLoop, calls=%fused_copy',
        '  ROOT %tuple.7 = (f32[8]{0}) tuple(%x)',
        "}",
    ])
    assert profile.classify(hlo) == {
        "dot.1": "matrix products", "custom-call.2": "BatchNorm sums",
        "custom-call.3": "depthwise", "fusion.4": "elementwise", "fusion.5": "BatchNorm sums",
        "copy.6": "data movement", "tuple.7": "other", "ynn_fusion.8": "matrix products",
        "copy_fusion.9": "data movement", "p": "other", "add.0": "elementwise",
        "reduce.0": "BatchNorm sums", "dot.0": "matrix products", "copy.0": "data movement",
    }


def _adabn_layers():
    """``benchmarks.results.adabn_layers``, imported as a package module."""
    return importlib.import_module("benchmarks.results.adabn_layers")


def test_adabn_layers_tiny(tmp_path, capsys):
    """``benchmarks.results.adabn_layers --tiny``: statistics re-estimated for chosen layers,
    each probed (its numbers mean nothing at this size); every layer's statistics are the pooled
    moments, so the all-layers variant differs from ImageNet's."""
    layers = _adabn_layers()
    out_json = tmp_path / "adabn.json"
    assert layers.main(["--tiny", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["variant"] for r in rows] == ["ImageNet's statistics (logits alone)",
                                            "all layers (AdaBN, the stats patch)", "stem only"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert "| stem only |" in capsys.readouterr().out


def test_adabn_layers_estimate_is_flax_batch_statistics():
    """With every layer's share 1 and one batch, ``estimate`` gives what Flax's training-mode
    BatchNorm measures (the reference), layer by layer."""
    import flax.linen as nn
    import jax

    from kfor1.tree import flatten

    layers = _adabn_layers()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.0, name="bn1")(
                nn.Conv(4, (3, 3), name="c1")(x))
            x = nn.BatchNorm(use_running_average=not train, momentum=0.0, name="bn2")(
                nn.Conv(4, (3, 3), name="c2")(nn.relu(x)))
            return x.mean((1, 2))

    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3)) * 3 + 1
    variables = Net().init(jax.random.key(1), x, train=False)
    _, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    ours = flatten(layers.estimate(Net(), variables, np.asarray(x), lambda i, p: 1.0, 16))
    for path, value in flatten(updates["batch_stats"]).items():  # momentum 0: the batch's.
        np.testing.assert_allclose(ours[path], value, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ours["bn2/var"], flatten(variables["batch_stats"])["bn2/var"])


def test_adabn_layers_first_layer_is_the_first_called():
    """A call-order variant ("stem only") re-estimates the layer the network calls first, even
    when its name sorts last (``z_stem`` here, as ``stem`` sorts after ``blocks_*`` in Lite0)."""
    import flax.linen as nn
    import jax

    from kfor1.tree import flatten

    layers = _adabn_layers()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train, name="z_stem")(x)
            x = nn.BatchNorm(use_running_average=not train, name="a_block")(
                nn.Conv(4, (3, 3), name="conv")(x))
            return x.mean((1, 2))

    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3)) * 3 + 1
    variables = Net().init(jax.random.key(1), x, train=False)
    before = flatten(variables["batch_stats"])
    after = flatten(layers.estimate(Net(), variables, np.asarray(x),
                                    lambda i, p: float(i < 1), 16))
    np.testing.assert_allclose(after["z_stem/mean"], np.asarray(x).mean((0, 1, 2)), rtol=1e-4)
    np.testing.assert_array_equal(after["a_block/mean"], before["a_block/mean"])
    np.testing.assert_array_equal(after["a_block/var"], before["a_block/var"])


def test_hostile_files_tiny(trained_run, tmp_path, capsys):
    """``python -m benchmarks.faults.hostile_files`` on three of its cases (issue 31): a model
    name that would import a file beside the patch, a weights file linked to /dev/zero, and
    class names with terminal escapes (which predict, escaped). None runs code or goes silent."""
    hostile = importlib.import_module("benchmarks.faults.hostile_files")
    out = tmp_path / "hostile.json"
    patch = trained_run[0] / "patches" / "colours"
    cases = "model_names_a_file_beside_it,msgpack_links_to_dev_zero,class_names_terminal_escapes"
    assert hostile.main(["--patch", str(patch), "--cases", cases, "--json", str(out)]) == 0
    counts = json.loads(out.read_text())["counts"]
    assert counts == {"cases": 3, "clean error": 2, "safe result": 1, "silent result": 0,
                      "code run": 0, "crash": 0}
    assert "cases: 3  clean error: 2" in capsys.readouterr().out


def test_presets_tiny(tmp_path, capsys):
    """``python -m benchmarks.results.presets`` on two patches at 2 steps (issue 36): the
    accuracy the trainer's evaluation reports is the exported patch's through ``PatchServer``."""
    presets = importlib.import_module("benchmarks.results.presets")
    out = tmp_path / "presets.json"
    presets.main(["--patches", "logits,input_stats+depthwise+logits", "--steps", "2",
                  "--resolution", "32", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["patch"] for r in rows] == ["logits", "input_stats+depthwise+logits"]
    for r in rows:
        assert r["evaluate"] == r["served"] and 0 <= r["evaluate"] <= 1
    assert "evaluate == served for every patch: True" in capsys.readouterr().out
