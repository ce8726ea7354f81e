"""Pretrained backbones: EfficientNet-Lite0..4 and MobileNetV2, with offline ImageNet weights."""

from kfor1.models.convert import WeightMismatchError
from kfor1.models.efficientnet_lite import efficientnet_lite
from kfor1.models.inverted_residual import BlockSpec, InvertedResidualNet
from kfor1.models.mobilenet_v2 import mobilenet_v2
from kfor1.models.pretrained import (
    Pretrained,
    detect_format,
    imagenet_class_names,
    imagenet_synsets,
    load_pretrained,
    packaged_weights_path,
)
from kfor1.models.registry import (
    DEFAULT_PREPROCESSING,
    ModelEntry,
    Preprocessing,
    UnknownModelError,
    available_models,
    create,
    get_entry,
    register,
    unregister,
)
from kfor1.models.torch_checkpoint import CheckpointFormatError, read_torch_state_dict

__all__ = [
    "DEFAULT_PREPROCESSING",
    "BlockSpec",
    "CheckpointFormatError",
    "InvertedResidualNet",
    "ModelEntry",
    "Preprocessing",
    "Pretrained",
    "WeightMismatchError",
    "available_models",
    "create",
    "detect_format",
    "efficientnet_lite",
    "get_entry",
    "imagenet_class_names",
    "imagenet_synsets",
    "load_pretrained",
    "mobilenet_v2",
    "packaged_weights_path",
    "read_torch_state_dict",
    "register",
    "unregister",
    "UnknownModelError",
]
