"""Reading Keras weights (a Keras model, an ``.h5`` weights/model file, a ``.keras`` archive)
into a flat ``{"layer/variable": array}`` dict, without building the Keras model."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import numpy as np

from kfor1.models.torch_checkpoint import CheckpointFormatError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")


def _short_name(name: str) -> str:
    """'block_1_expand/kernel:0' or 'model/block_1_expand/kernel' -> 'block_1_expand/kernel'."""
    parts = name.split(":")[0].split("/")
    return "/".join(parts[-2:])


def from_keras_model(model: Any) -> dict[str, np.ndarray]:
    """Weights of a live Keras (2 or 3) model."""
    out = {}
    for layer in model.layers:
        for var in layer.weights:
            name = getattr(var, "path", None) or var.name
            var_name = _short_name(name).split("/")[-1]
            out[_normalise(f"{layer.name}/{var_name}")] = np.asarray(var)
    return out


def _var_names(layer: str, count: int) -> tuple[str, ...]:
    """Keras 3 stores variables by position; their names follow from the layer type."""
    if layer.startswith("batch_normalization") and count == 4:
        return _BN_VARS
    return ("kernel", "bias")[:count]


def _normalise(name: str) -> str:
    # Keras 2 calls a depthwise kernel 'depthwise_kernel', Keras 3 'kernel'.
    return name.replace("/depthwise_kernel", "/kernel")


def _read_h5(handle: Any) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(handle, "r") as f:
        root = f.get("model_weights", f)
        out: dict[str, np.ndarray] = {}
        if "layer_names" in root.attrs:  # Keras 2 / legacy h5 layout.
            for layer in root.attrs["layer_names"]:
                layer = layer.decode() if isinstance(layer, bytes) else layer
                group = root[layer]
                for weight in group.attrs.get("weight_names", []):
                    weight = weight.decode() if isinstance(weight, bytes) else weight
                    var = _short_name(weight).split("/")[-1]
                    out[_normalise(f"{layer}/{var}")] = np.asarray(group[weight])
            return out
        if "layers" in root:
            # Keras 3 layout: layers/<type>_<n>/vars/<i>, named by layer type and creation
            # order (conv2d_7), not by layer name; convert.py restores the names.
            for layer, group in root["layers"].items():
                if "vars" not in group:
                    continue
                count = len(group["vars"])
                for i, var in enumerate(_var_names(layer, count)):
                    out[f"{layer}/{var}"] = np.asarray(group["vars"][str(i)])
            return out
    raise CheckpointFormatError("HDF5 file holds no Keras weights (no layer_names, no layers/)")


def read_keras_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Weights of an ``.h5`` (Keras 2 or 3) or ``.keras`` file, by ``layer/variable`` name."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if head == HDF5_MAGIC:
            return _read_h5(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "model.weights.h5" in archive.namelist():
                    return _read_h5(io.BytesIO(archive.read("model.weights.h5")))
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path}: {e}") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointFormatError(
            f"{path} is a truncated or corrupt Keras file ({type(e).__name__}); re-export it"
        ) from None
    raise CheckpointFormatError(
        f"{path} is not a Keras weights file (.h5 or .keras); save one with "
        "model.save('model.keras') or model.save_weights('model.weights.h5')"
    )
