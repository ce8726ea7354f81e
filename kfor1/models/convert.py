"""Weight converters: source checkpoints (PyTorch, Keras) to Flax variables.

Each converter is a *mapping* from a Flax variable path (``params/stem/conv/kernel``) to a
source key and a layout transform; ``assign`` applies it to the model's abstract variables and
checks every shape, so a wrong file fails early with the parameter, both shapes and the file.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np

from kfor1.errors import UserError
from kfor1.models.inverted_residual import InvertedResidualNet

Transform = Callable[[np.ndarray], np.ndarray]
Mapping_ = dict[str, tuple[str, Transform]]


class WeightMismatchError(UserError, ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _torch_conv(w: np.ndarray) -> np.ndarray:
    # (out, in, kh, kw) -> (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, 1, C).
    return w.transpose(2, 3, 1, 0)


def _torch_dense(w: np.ndarray) -> np.ndarray:
    return w.T


def _keras_depthwise(w: np.ndarray) -> np.ndarray:
    # Keras (kh, kw, C, 1) -> (kh, kw, 1, C).
    return w.transpose(0, 1, 3, 2)


def _conv_bn(flax_prefix: str, conv_key: str, bn: tuple[str, str, str, str], conv_fn: Transform):
    """Entries for one ConvBN module: kernel, then BN scale, bias, mean, var."""
    scale, bias, mean, var = bn
    return {
        f"params/{flax_prefix}/conv/kernel": (conv_key, conv_fn),
        f"params/{flax_prefix}/bn/scale": (scale, _identity),
        f"params/{flax_prefix}/bn/bias": (bias, _identity),
        f"batch_stats/{flax_prefix}/bn/mean": (mean, _identity),
        f"batch_stats/{flax_prefix}/bn/var": (var, _identity),
    }


def _torch_bn(prefix: str) -> tuple[str, str, str, str]:
    return (f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.running_mean", f"{prefix}.running_var")


def _keras_bn(layer: str) -> tuple[str, str, str, str]:
    return (f"{layer}/gamma", f"{layer}/beta", f"{layer}/moving_mean", f"{layer}/moving_variance")


def efficientnet_lite_torch_mapping(model: InvertedResidualNet) -> Mapping_:
    """lukemelas-style names (``_blocks.3._depthwise_conv.weight``) of the EfficientNet-Lite
    PyTorch checkpoints."""
    m = _conv_bn("stem", "_conv_stem.weight", _torch_bn("_bn0"), _torch_conv)
    for i, spec in enumerate(model.blocks):
        src = f"_blocks.{i}."
        if spec.expand_ratio != 1:
            m |= _conv_bn(f"blocks_{i}/expand", src + "_expand_conv.weight",
                          _torch_bn(src + "_bn0"), _torch_conv)
        m |= _conv_bn(f"blocks_{i}/depthwise", src + "_depthwise_conv.weight",
                      _torch_bn(src + "_bn1"), _torch_conv)
        m |= _conv_bn(f"blocks_{i}/project", src + "_project_conv.weight",
                      _torch_bn(src + "_bn2"), _torch_conv)
    m |= _conv_bn("top", "_conv_head.weight", _torch_bn("_bn1"), _torch_conv)
    m["params/head/logits/kernel"] = ("_fc.weight", _torch_dense)
    m["params/head/logits/bias"] = ("_fc.bias", _identity)
    return m


def torchvision_mobilenet_v2_mapping(model: InvertedResidualNet) -> Mapping_:
    """torchvision's ``features.N...`` names of ``torchvision.models.mobilenet_v2``."""
    m = _conv_bn("stem", "features.0.0.weight", _torch_bn("features.0.1"), _torch_conv)
    for i, spec in enumerate(model.blocks):
        src = f"features.{i + 1}.conv."
        layer = 0
        if spec.expand_ratio != 1:
            m |= _conv_bn(f"blocks_{i}/expand", src + "0.0.weight", _torch_bn(src + "0.1"),
                          _torch_conv)
            layer = 1
        m |= _conv_bn(f"blocks_{i}/depthwise", f"{src}{layer}.0.weight",
                      _torch_bn(f"{src}{layer}.1"), _torch_conv)
        m |= _conv_bn(f"blocks_{i}/project", f"{src}{layer + 1}.weight",
                      _torch_bn(f"{src}{layer + 2}"), _torch_conv)
    top = f"features.{len(model.blocks) + 1}"
    m |= _conv_bn("top", f"{top}.0.weight", _torch_bn(f"{top}.1"), _torch_conv)
    m["params/head/logits/kernel"] = ("classifier.1.weight", _torch_dense)
    m["params/head/logits/bias"] = ("classifier.1.bias", _identity)
    return m


def keras_mobilenet_v2_mapping(model: InvertedResidualNet) -> Mapping_:
    """Layer names of ``keras.applications.MobileNetV2`` (``block_3_depthwise``...)."""
    m = _conv_bn("stem", "Conv1/kernel", _keras_bn("bn_Conv1"), _identity)
    for i, spec in enumerate(model.blocks):
        name = "expanded_conv" if i == 0 else f"block_{i}"
        if spec.expand_ratio != 1:
            m |= _conv_bn(f"blocks_{i}/expand", f"{name}_expand/kernel",
                          _keras_bn(f"{name}_expand_BN"), _identity)
        m |= _conv_bn(f"blocks_{i}/depthwise", f"{name}_depthwise/kernel",
                      _keras_bn(f"{name}_depthwise_BN"), _keras_depthwise)
        m |= _conv_bn(f"blocks_{i}/project", f"{name}_project/kernel",
                      _keras_bn(f"{name}_project_BN"), _identity)
    m |= _conv_bn("top", "Conv_1/kernel", _keras_bn("Conv_1_bn"), _identity)
    m["params/head/logits/kernel"] = ("predictions/kernel", _identity)
    m["params/head/logits/bias"] = ("predictions/bias", _identity)
    return m


def _keras_layers_in_order(model: InvertedResidualNet) -> dict[str, list[str]]:
    """MobileNetV2's Keras layer names per layer type, in the order Keras creates them."""
    order: dict[str, list[str]] = {"conv2d": ["Conv1"], "batch_normalization": ["bn_Conv1"],
                                   "depthwise_conv2d": [], "dense": []}
    for i, spec in enumerate(model.blocks):
        name = "expanded_conv" if i == 0 else f"block_{i}"
        if spec.expand_ratio != 1:
            order["conv2d"].append(f"{name}_expand")
            order["batch_normalization"].append(f"{name}_expand_BN")
        order["depthwise_conv2d"].append(f"{name}_depthwise")
        order["batch_normalization"].append(f"{name}_depthwise_BN")
        order["conv2d"].append(f"{name}_project")
        order["batch_normalization"].append(f"{name}_project_BN")
    order["conv2d"].append("Conv_1")
    order["batch_normalization"].append("Conv_1_bn")
    order["dense"].append("predictions")
    return order


_KERAS3_LAYER = re.compile(r"^(conv2d|batch_normalization|depthwise_conv2d|dense)(?:_(\d+))?/")


def restore_keras_layer_names(
    source: Mapping[str, np.ndarray], model: InvertedResidualNet
) -> dict[str, np.ndarray]:
    """Renames Keras 3 file entries (``conv2d_7/kernel``) to layer names (``block_2_expand``).

    Keras 3 files key layers by type and creation order; relative order within each type is
    all that is used, so files from sessions that built other models first still map.
    """
    if not any(_KERAS3_LAYER.match(k) for k in source) or "Conv1/kernel" in source:
        return dict(source)
    by_type: dict[str, set[int]] = {}
    for key in source:
        if match := _KERAS3_LAYER.match(key):
            by_type.setdefault(match[1], set()).add(int(match[2] or 0))
    names = _keras_layers_in_order(model)
    renamed = {}
    for key, value in source.items():
        match = _KERAS3_LAYER.match(key)
        if not match:
            renamed[key] = value
            continue
        rank = sorted(by_type[match[1]]).index(int(match[2] or 0))
        layers = names[match[1]]
        layer = layers[rank] if rank < len(layers) else key.split("/")[0]
        renamed[f"{layer}/{key.split('/', 1)[1]}"] = value
    return renamed


HEAD_PATHS = ("params/head/logits/kernel", "params/head/logits/bias")
IGNORED_SOURCE_SUFFIXES = ("num_batches_tracked",)


def abstract_variables(model: InvertedResidualNet) -> dict[str, Any]:
    """Shapes and dtypes of the model's variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def assign(
    model: InvertedResidualNet,
    mapping: Mapping_,
    source: Mapping[str, np.ndarray],
    source_name: str,
    rng: jax.Array | None = None,
) -> dict[str, Any]:
    """Fills the model's variables from ``source`` through ``mapping``, checking shapes.

    A head whose class count differs from the file's is re-initialised, with a warning; any
    other mismatch raises ``WeightMismatchError`` naming the parameter, both shapes and the file.
    """
    template = flax.traverse_util.flatten_dict(abstract_variables(model), sep="/")
    unmapped = sorted(set(template) - set(mapping))
    if unmapped:  # A bug in a mapping, never the user's fault.
        raise AssertionError(f"converter does not cover {unmapped[:5]}")
    missing = sorted({key for key, _ in mapping.values() if key not in source})
    if missing:
        raise WeightMismatchError(
            f"{source_name} lacks {len(missing)} parameters this model needs, e.g. "
            f"{', '.join(missing[:3])}; is it a checkpoint of a different architecture?"
        )
    used = {key for key, _ in mapping.values()}
    extra = sorted(k for k in source if k not in used and not k.endswith(IGNORED_SOURCE_SUFFIXES))
    if extra:
        raise WeightMismatchError(
            f"{source_name} has {len(extra)} parameters this model does not, e.g. "
            f"{', '.join(extra[:3])}; is it a checkpoint of a different architecture or width?"
        )
    flat, reinit_head = {}, False
    for path, abstract in template.items():
        key, fn = mapping[path]
        value = np.asarray(fn(np.asarray(source[key])), dtype=abstract.dtype)
        if value.shape != abstract.shape:
            if path in HEAD_PATHS and value.shape[:-1] == abstract.shape[:-1]:
                reinit_head = True
                continue
            raise WeightMismatchError(
                f"shape mismatch for {path}: the model expects {abstract.shape}, {source_name} "
                f"has {value.shape} (from {key!r}); check the model name and width"
            )
        flat[path] = value
    if reinit_head:
        file_classes = np.shape(source[mapping[HEAD_PATHS[1]][0]])[0]
        warnings.warn(
            f"{source_name} has a {file_classes}-class head and the model has "
            f"{model.num_classes} classes: head/logits was re-initialised",
            stacklevel=3,
        )
        in_features = template[HEAD_PATHS[0]].shape[0]
        head = flax.linen.Dense(model.num_classes).init(
            jax.random.key(0) if rng is None else rng, np.zeros((1, in_features), np.float32)
        )
        flat[HEAD_PATHS[0]] = np.asarray(head["params"]["kernel"])
        flat[HEAD_PATHS[1]] = np.asarray(head["params"]["bias"])
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def check_shapes(expected: Any, variables: Any, source_name: str) -> None:
    """Raises ``WeightMismatchError`` unless ``variables`` has exactly ``expected``'s leaves
    (paths and shapes): the check a user's ``load_fn`` gets before its weights are trained."""
    if not isinstance(variables, Mapping):
        raise WeightMismatchError(f"{source_name} returned a {type(variables).__name__}; it "
                                  "must return the model's variables, a dict like model.init's")
    want = flax.traverse_util.flatten_dict(dict(expected), sep="/")
    got = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    for what, keys in (("lacks", sorted(set(want) - set(got))),
                       ("has extra", sorted(set(got) - set(want)))):
        if keys:
            raise WeightMismatchError(f"{source_name} {what} {len(keys)} variables compared "
                                      f"with model.init, e.g. {', '.join(keys[:3])}")
    for path, abstract in want.items():
        if tuple(np.shape(got[path])) != tuple(abstract.shape):
            raise WeightMismatchError(
                f"shape mismatch for {path}: the model expects {tuple(abstract.shape)}, "
                f"{source_name} gives {tuple(np.shape(got[path]))}"
            )
