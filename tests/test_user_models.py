"""User models: ``kfor1.models.register`` and ``model="package.module:factory"`` in configs, so a
Flax model kfor1 does not define trains, exports and predicts through the CLI.

Read as a specification of the user-model half of ``kfor1.models.registry`` and of
``load_pretrained`` for user models.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_runs import run_config, write_folder

import kfor1
from kfor1.files.patchfile import load_patch, load_patched
from kfor1.models import (
    Preprocessing,
    UnknownModelError,
    WeightMismatchError,
    create,
    get_entry,
    load_pretrained,
    register,
    unregister,
)
from kfor1.trainer import cli
from kfor1.trainer.config import ConfigError
from kfor1.trainer.experiment import model_kwargs
from kfor1.tree import flatten

FACTORY = "tests.user_model:factory"


@pytest.fixture
def registered():
    from tests.user_model import UserNet

    entry = register("user_net", lambda num_classes=4: UserNet(num_classes),
                     preprocessing=Preprocessing((0.0,) * 3, (255.0,) * 3, resolution=24))
    yield entry
    unregister("user_net")


def test_module_factory_trains_exports_and_predicts_through_the_cli(tmp_path, capsys):
    folder = write_folder(tmp_path / "colours")
    config = tmp_path / "config.py"
    config.write_text(
        "from tiny_runs import run_config\n"
        f"def get_config():\n    return run_config({str(folder)!r}, num_steps=4)\n"
    )
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", str(config), f"--config.model={FACTORY}",
                     "--config.patch=scale_bias+logits", "--workdir", str(workdir)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((workdir / "patches" / "colours" / "patch.json").read_text())
    assert meta["base"]["model"] == FACTORY
    assert meta["preprocessing"]["resolution"] == 32
    # The presets found the user's BatchNorm layers and head under its own names.
    patch = load_patch(workdir / "patches" / "colours")
    assert sorted(flatten(patch.variables["params"])) == [
        "classifier/bias", "classifier/kernel", "features_dw_norm/bias", "features_dw_norm/scale",
        "features_norm/bias", "features_norm/scale"]
    # A factory the patch names is imported only when the user names it too (issue 31).
    with pytest.raises(UnknownModelError, match="never imports code because a file names it"):
        load_patched(workdir / "patches" / "colours")
    task = load_patched(workdir / "patches" / "colours", model=FACTORY)
    assert type(task.model).__name__ == "UserNet" and task.model.num_classes == 3
    assert task.class_names == ("blue", "green", "red")
    image = tmp_path / "red.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(image)
    capsys.readouterr()
    patch_args = ["predict", "--patch", str(workdir / "patches" / "colours"), "--model", FACTORY]
    assert cli.main([*patch_args, str(image)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(image)
    assert cli.main([*patch_args, "--top-k", "5", str(image)]) == 2
    assert "has only 3 classes; use --top-k 3 or less" in capsys.readouterr().err


def test_a_registered_name_works_as_config_model(registered, tmp_path):
    assert "user_net" in kfor1.models.available_models()
    base = load_pretrained("user_net")
    assert base.model.num_classes == 4 and base.preprocessing.resolution == 24
    assert base.source == "random init (seed 0)"
    again = load_pretrained("user_net")  # Seeded: the same base, so patches find it again.
    jax.tree.map(np.testing.assert_array_equal, base.variables, again.variables)
    config = run_config(write_folder(tmp_path / "c"), model="user_net", num_steps=2)
    from kfor1.trainer.loop import train

    summary = train(config, str(tmp_path / "run"))
    assert set(summary["tasks"]) == {"digits", "colours"}


def test_load_fn_weights_are_used_and_checked():
    base = load_pretrained("tests.user_model:with_weights")
    from tests.user_model import load

    expected = load(base.model, None)
    jax.tree.map(np.testing.assert_array_equal, base.variables, expected)
    assert base.source == "tests.user_model:with_weights's load_fn"

    def bad_load(model, path):
        variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        variables["params"]["classifier"]["kernel"] = jnp.zeros((3, 3))
        return variables

    from tests.user_model import UserNet

    register("bad_net", UserNet, load_fn=bad_load)
    try:
        with pytest.raises(WeightMismatchError, match="classifier/kernel.*expects"):
            load_pretrained("bad_net")
    finally:
        unregister("bad_net")


def test_options_go_to_the_factory_only_if_it_takes_them():
    config = kfor1.trainer.config.base_config()
    config.model = FACTORY
    assert model_kwargs(config) == {}  # conv_impl and bn_momentum at defaults: dropped.
    config.dtype = "bfloat16"
    assert model_kwargs(config) == {"dtype": jnp.bfloat16}
    assert create(FACTORY, **model_kwargs(config)).dtype == jnp.bfloat16
    config.conv_impl = "shifted"
    with pytest.raises(ConfigError, match="config.conv_impl='shifted'.*takes no 'conv_impl'"):
        model_kwargs(config)


@pytest.mark.parametrize("name, message", [
    ("tests.no_such_module:factory", "no module 'tests.no_such_module' to import"),
    ("tests.user_model:nothing", "has no 'nothing'"),
    ("tests.user_model:UserNet.x", "has no 'UserNet.x'"),
    ("tests.user_model:", "write a user model as 'package.module:factory'"),
    ("tests.user_model:__doc__", "is a str, not a function"),
    ("no_such_net", "unknown model 'no_such_net'.*package.module:factory"),
])
def test_bad_model_names_are_one_line_user_errors(name, message):
    with pytest.raises(UnknownModelError, match=message):
        create(name)


def test_a_factory_that_does_not_build_a_module_is_refused():
    register("not_a_module", lambda num_classes=3: "a string")
    try:
        with pytest.raises(UnknownModelError, match="returned a str.*Flax module"):
            create("not_a_module")
    finally:
        unregister("not_a_module")


def test_register_refuses_kfor1_names_and_bad_arguments(registered):
    with pytest.raises(ValueError, match="cannot register a model as 'mobilenet_v2'"):
        register("mobilenet_v2", lambda num_classes=3: None)
    with pytest.raises(TypeError, match="must be callables"):
        register("x", "not callable")
    with pytest.raises(TypeError, match="preprocessing must be"):
        register("x", lambda **kw: None, preprocessing=224)
    assert get_entry("user_net") is registered


def test_weights_without_a_load_fn_are_refused(registered, tmp_path):
    file = tmp_path / "w.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="has no load_fn.*register it with load_fn="):
        load_pretrained("user_net", path=file)


def test_a_config_with_a_user_model_is_checked_by_dry_run(tmp_path):
    from kfor1.trainer.dryrun import dry_run

    config = run_config(write_folder(tmp_path / "c"), model=FACTORY)
    text, problems = dry_run(config)
    assert problems == []
    assert "its own initialisation" in text and "7-class head" in text


def test_params_finds_a_user_models_depthwise_kernels(capsys):
    assert cli.main(["params", "--model", FACTORY, "--patch", "depthwise"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()}
    assert rows["depthwise"][1:3] == ["1", "72"]  # features_dw: 3 x 3 x 1 x 8.
