"""Issue 13's user errors through the real entry points — the ``kfor1`` console script and
``python -m launch.train`` — each one ``error: ...`` line naming what was wrong, exit status 2,
and no "Traceback" on stderr. One subprocess per entry point runs every case
(``entry_point_cases.py``), so the check costs two interpreter starts, not forty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSFER = "configs/transfer.py:dataset=digits"

# name: (argv after `train`, a fragment the one line must contain)
TRAIN_CASES = {
    "unknown_config_flag": (["--config", TRANSFER, "--config.nonexistent_key=3"],
                            "nonexistent_key"),
    "unknown_config_argument": (["--config", f"{TRANSFER},foo=3"],
                                "unknown config argument 'foo'"),
    "misspelt_config_argument": (["--config", f"{TRANSFER},num_step=3"],
                                 "did you mean 'num_steps'"),
    "num_steps_not_an_integer": (["--config", f"{TRANSFER},num_steps=abc"],
                                 "num_steps='abc': expected an integer"),
    "resolution_not_an_integer": (["--config", f"{TRANSFER},resolution=abc"],
                                  "resolution='abc': expected an integer"),
    "checkpoint_every_zero": (["--config", TRANSFER, "--config.checkpoint_every=0"],
                              "checkpoint_every"),
    "log_every_zero": (["--config", TRANSFER, "--config.log_every=0"], "log_every"),
    "zero_steps": (["--config", TRANSFER, "--config.num_steps=0"], "num_steps"),
    "config_file_missing": (["--config", "configs/no_such_config.py"], "no_such_config"),
    "resolution_1": (["--config", f"{TRANSFER},resolution=1"], "resolution"),
    "unknown_patch_preset": (["--config", f"{TRANSFER},patch=scale_bais"], "scale_bais"),
    "unknown_model": (["--config", f"{TRANSFER},model=efficientnet_lite9"],
                      "efficientnet_lite9"),
    # After the cases before it, JAX has run in this process: that is the message here (the
    # one of a fresh process without a cluster is tested in test_distributed.py).
    "distributed_after_jax_has_run": (["--config", TRANSFER, "--config.distributed=true"],
                                      "config.distributed=True needs a process"),
}


def _patch_cases(patch: Path, root: Path) -> dict[str, tuple[list[str], str]]:
    """Broken copies of a trained patch, each predicted on one image."""
    image = root / "image.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)

    def edited(name: str, edit) -> str:
        out = root / name
        import shutil

        shutil.copytree(patch, out)
        meta = json.loads((out / "patch.json").read_text())
        (out / "patch.json").write_text(json.dumps(edit(meta)))
        return str(out)

    def without_base(meta):
        meta.pop("base")
        return meta

    cases = {
        "patch_json_is_a_list": (edited("as_list", lambda m: [m]), "patch"),
        "patch_without_base": (edited("no_base", without_base), "base"),
        "patch_format_version_a_string": (
            edited("version_str", lambda m: {**m, "format_version": "1"}), "corrupt"),
        "patch_num_classes_do_not_fit": (edited("classes", lambda m: {**m, "num_classes": 7}),
                                         "corrupt"),
        "patch_fewer_class_names": (
            edited("names", lambda m: {**m, "class_names": m["class_names"][:1]}), "corrupt"),
    }
    flipped = root / "flipped"
    import shutil

    shutil.copytree(patch, flipped)
    data = bytearray((flipped / "patch.msgpack").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    (flipped / "patch.msgpack").write_bytes(bytes(data))
    out = {name: (["predict", "--patch", d, str(image)], frag)
           for name, (d, frag) in cases.items()}
    out["patch_with_flipped_bytes"] = (["predict", "--patch", str(flipped), str(image)],
                                       "corrupt")
    out["predict_model_with_patch"] = (
        ["predict", "--model", "nope", "--patch", str(patch), str(image)], "--model")
    out["predict_top_k_above_the_classes"] = (
        ["predict", "--patch", str(patch), str(image), "--top-k", "9"], "--top-k 9")
    out["predict_a_missing_image"] = (["predict", "--patch", str(patch), str(root / "no.jpg")],
                                      "no.jpg")
    return out


@pytest.fixture(scope="module")
def results(trained_run, tmp_path_factory):
    """``{entry: {case: {"code", "stderr", "fragment"}}}`` for both entry points."""
    workdir, _ = trained_run
    root = tmp_path_factory.mktemp("entry_points")
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    train = {name: ([*argv, "--workdir", str(root / "runs" / name)], frag)
             for name, (argv, frag) in TRAIN_CASES.items()}
    train["workdir_is_a_file"] = (["--config", TRANSFER, "--workdir", str(a_file)],
                                  "is a file")
    others = _patch_cases(workdir / "patches" / "colours", root)
    others["eval_of_a_pruned_step"] = (["eval", "--workdir", str(workdir), "--step", "1"],
                                       "keeps steps")
    others["eval_of_a_directory_that_is_no_run"] = (["eval", "--workdir", str(root)],
                                                    "config.json")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = {}
    for entry, cases in (("kfor1", {**{n: (["train", *a], f) for n, (a, f) in train.items()},
                                    **others}),
                         ("launch.train", train)):
        cases_file, out_file = root / f"{entry}.cases.json", root / f"{entry}.out.json"
        cases_file.write_text(json.dumps({n: a for n, (a, _) in cases.items()}))
        subprocess.run([sys.executable, str(REPO / "tests" / "entry_point_cases.py"), entry,
                        str(cases_file), str(out_file)], cwd=REPO, env=env, check=True,
                       timeout=900)
        recorded = json.loads(out_file.read_text())
        out[entry] = {n: {**recorded[n], "fragment": f} for n, (_, f) in cases.items()}
    return out


ALL_KFOR1 = [*TRAIN_CASES, "workdir_is_a_file", "patch_json_is_a_list", "patch_without_base",
             "patch_format_version_a_string", "patch_num_classes_do_not_fit",
             "patch_fewer_class_names", "patch_with_flipped_bytes", "predict_model_with_patch",
             "predict_top_k_above_the_classes", "predict_a_missing_image",
             "eval_of_a_pruned_step", "eval_of_a_directory_that_is_no_run"]


def _check(result: dict) -> None:
    err = result["stderr"]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert result["fragment"] in lines[0], lines[0]


@pytest.mark.parametrize("case", ALL_KFOR1)
def test_kfor1_prints_one_line(results, case):
    _check(results["kfor1"][case])


@pytest.mark.parametrize("case", [*TRAIN_CASES, "workdir_is_a_file"])
def test_launch_train_prints_one_line(results, case):
    _check(results["launch.train"][case])


def test_every_case_ran(results):
    assert set(results["kfor1"]) == set(ALL_KFOR1)
