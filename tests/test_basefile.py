"""Jointly trained backbones ship: a ``train_shared`` run exports its trained base once
(``base/``), its patches record that base's fingerprint and find it, and they are refused on
any other base with a message that names the one they need.

Read as a specification of ``kfor1.files.basefile`` and of the trained-base half of
``kfor1.files.patchfile.load_patched``.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_runs import run_config

from kfor1.files.basefile import (
    BaseFileError,
    export_base,
    fingerprint,
    load_base_dir,
)
from kfor1.files.patchfile import PatchFileError, apply_patch, load_patch, load_patched
from kfor1.models import Pretrained, create, load_pretrained
from kfor1.multitask.state import task_variables
from kfor1.trainer import cli
from kfor1.trainer.workdir import restore


@pytest.fixture(scope="module")
def shared_run(colours, tmp_path_factory):
    """A K = 2 run that trains its backbone with the patches (Lite0, 32 px, 4 steps)."""
    from kfor1.trainer.loop import train

    workdir = tmp_path_factory.mktemp("train_shared")
    train(run_config(colours, train_shared=True, num_steps=4), str(workdir))
    return workdir


def _images(n=6, size=32):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_patches_on_the_exported_base_give_bitwise_the_trained_models_logits(shared_run):
    s, state = restore(shared_run)
    record = json.loads((shared_run / "base" / "base.json").read_text())
    assert record["model"] == "efficientnet_lite0" and record["step"] == 4
    for k, name in enumerate(("digits", "colours")):
        meta = json.loads((shared_run / "patches" / name / "patch.json").read_text())
        assert meta["base"]["trained"] is True and meta["base"]["dir"] == "../../base"
        assert meta["base"]["fingerprint"] == record["fingerprint"]
        task = load_patched(shared_run / "patches" / name)
        trained = task_variables(state, k)
        jax.tree.map(np.testing.assert_array_equal, task.variables, trained)
        reference = Pretrained(name, s.model.clone(num_classes=task.model.num_classes),
                               trained, task.preprocessing, task.class_names, "state")
        np.testing.assert_array_equal(np.asarray(task.logits(_images())),
                                      np.asarray(reference.logits(_images())))


def test_the_same_patches_are_refused_on_the_pretrained_base(shared_run):
    patch = load_patch(shared_run / "patches" / "colours")
    expected = patch.meta["base"]["fingerprint"][:12]
    with pytest.raises(PatchFileError, match=rf"needs that run's exported base: "
                       rf"'efficientnet_lite0' with fingerprint {expected}.*--base"):
        apply_patch(load_pretrained("efficientnet_lite0").variables, patch)
    with pytest.raises(PatchFileError, match="not a weights file"):
        load_patched(shared_run / "patches" / "colours", weights="some.pth")


def test_a_moved_patch_asks_for_its_base_and_takes_it(shared_run, tmp_path):
    moved = tmp_path / "colours"
    shutil.copytree(shared_run / "patches" / "colours", moved)
    with pytest.raises(PatchFileError, match=r"exported base is not at .*pass the run's base/ "
                       r"directory \(base=, --base\)"):
        load_patched(moved)
    task = load_patched(moved, base=shared_run / "base")
    assert task.class_names == ("blue", "green", "red")


def test_predict_finds_the_base_or_takes_base(shared_run, tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(image)
    patch = str(shared_run / "patches" / "colours")
    assert cli.main(["predict", "--patch", patch, str(image)]) == 0
    found = capsys.readouterr().out
    assert cli.main(["predict", "--patch", patch, "--base", str(shared_run / "base"),
                     str(image)]) == 0
    assert capsys.readouterr().out == found
    assert cli.main(["predict", "--base", str(shared_run / "base"), str(image)]) == 2
    assert "--base and --requests need --patch" in capsys.readouterr().err


def test_export_writes_the_base_beside_the_patches(shared_run, tmp_path, capsys):
    assert cli.main(["export", "--workdir", str(shared_run), "--out", str(tmp_path)]) == 0
    assert f"trained base: {tmp_path / 'base'}" in capsys.readouterr().out
    for name in ("base.msgpack", "base.json"):
        assert (tmp_path / "base" / name).read_bytes() == (shared_run / "base" / name).read_bytes()
    load_patched(tmp_path / "patches" / "digits")


def test_a_frozen_runs_patches_are_as_before(trained_run):
    workdir, _ = trained_run
    assert not (workdir / "base").exists()
    meta = json.loads((workdir / "patches" / "colours" / "patch.json").read_text())
    assert set(meta["base"]) == {"model", "weights", "source", "fingerprint"}


def test_a_changed_or_missing_base_file_is_refused(shared_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(shared_run / "base", base)
    data = bytearray((base / "base.msgpack").read_bytes())
    data[-3] ^= 0xFF  # One byte of the last array.
    (base / "base.msgpack").write_bytes(bytes(data))
    with pytest.raises(BaseFileError, match="changed after export"):
        load_base_dir(base)
    (base / "base.json").write_text("{not json")
    with pytest.raises(BaseFileError, match="base.json is not valid JSON"):
        load_base_dir(base)
    (base / "base.json").unlink()
    with pytest.raises(BaseFileError, match="base.json is missing"):
        load_base_dir(base)


def test_the_architecture_is_rebuilt_from_the_record(tmp_path):
    # The torchvision flavour of MobileNetV2 differs from the registry's default (Keras) only
    # in fields: padding, BN epsilon and momentum, dropout.
    model = create("mobilenet_v2_035", num_classes=1000, flavor="torchvision")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    preprocessing = {"mean": [0.0] * 3, "std": [1.0] * 3, "resolution": 32}
    printed = export_base(variables, model, ["params/head/logits/bias"], tmp_path,
                          {"model": "mobilenet_v2_035", "preprocessing": preprocessing})
    base = load_base_dir(tmp_path)
    assert base.model.padding == "SYMMETRIC" and base.model.bn_epsilon == 1e-5
    assert printed == fingerprint(base.variables, exclude={"params/head/logits/bias"})
    jax.tree.map(np.testing.assert_array_equal, base.variables, variables)
