"""Model registry: names to architectures, with each model's input preprocessing."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np

from kfor1.models.efficientnet_lite import VARIANTS, efficientnet_lite
from kfor1.models.mobilenet_v2 import mobilenet_v2


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model expects its pixels: ``(x - mean) / std`` on 0..255 values, at ``resolution``.

    ``crop_fraction`` is the evaluation centre crop: resize the shorter side to
    ``resolution / crop_fraction``, then crop ``resolution`` pixels from the centre.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int
    crop_fraction: float = 0.875

    def normalize(self, images: Any) -> Any:
        """Maps uint8 (or 0..255 float) NHWC images to the model's input range, as float32."""
        xp = np if isinstance(images, np.ndarray) else _jnp()
        images = xp.asarray(images, dtype=xp.float32)
        if images.shape[-1:] != (3,):
            raise ValueError(
                f"expected NHWC images (channels last, 3 channels), got shape {images.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        return (images - xp.asarray(self.mean, xp.float32)) / xp.asarray(self.std, xp.float32)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            mean=tuple(data["mean"]), std=tuple(data["std"]), resolution=int(data["resolution"]),
            crop_fraction=float(data.get("crop_fraction", 0.875)),
        )


def _jnp():
    import jax.numpy as jnp

    return jnp


# EfficientNet-Lite was trained on (x - 127) / 128; Keras MobileNetV2 on x / 127.5 - 1;
# torchvision on ImageNet mean/std.
LITE_PREPROCESSING = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
KERAS_PREPROCESSING = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
TORCHVISION_PREPROCESSING = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: how to build it and what its inputs look like."""

    name: str
    build: Callable[..., nn.Module]
    preprocessing: Preprocessing
    description: str


def _entries() -> dict[str, ModelEntry]:
    entries = {}
    for variant, (_, _, resolution, _) in VARIANTS.items():
        name = f"efficientnet_lite{variant}"
        entries[name] = ModelEntry(
            name,
            functools.partial(efficientnet_lite, variant),
            Preprocessing(*LITE_PREPROCESSING, resolution=resolution),
            f"EfficientNet-Lite{variant} ({resolution} px)",
        )
    for width in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
        suffix = "" if width == 1.0 else f"_{int(round(width * 100)):03d}"
        name = f"mobilenet_v2{suffix}"
        entries[name] = ModelEntry(
            name,
            functools.partial(mobilenet_v2, width),
            Preprocessing(*KERAS_PREPROCESSING, resolution=224),
            f"MobileNetV2, width {width} (Keras flavour; torchvision weights switch it)",
        )
    return entries


MODELS: dict[str, ModelEntry] = _entries()


def available_models() -> list[str]:
    return sorted(MODELS)


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}"
        ) from None


def create(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Builds a registered model; ``kwargs`` override fields (dtype, dropout_rate, conv_impl...).

    Example: ``kfor1.models.create("efficientnet_lite0", num_classes=10)``.
    """
    return get_entry(name).build(num_classes=num_classes, **kwargs)
