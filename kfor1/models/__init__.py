"""Pretrained backbones: EfficientNet-Lite0..4 and MobileNetV2, with offline ImageNet weights.

Every model is a ``flax.linen`` module with readable parameter paths (``stem/conv/kernel``,
``blocks_3/depthwise/conv/kernel``, ``head/logits/kernel``), named in a registry that also
holds its preprocessing; a user's own Flax model joins the registry with ``register``.

Station 2 of the data's order (config -> data -> **model + weights** -> patch -> ...), over
``kfor1.layers``. May import ``kfor1.layers`` and the shared root modules only.

Example:
  >>> kfor1.models.available_models()[:3]
  ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2']
  >>> base = kfor1.models.load_pretrained("mobilenet_v2")  # torchvision's, from the pip package
  >>> base.preprocessing.resolution
  224
  >>> model = kfor1.models.create("efficientnet_lite2", num_classes=0)  # pooled features
  >>> kfor1.models.get_entry("efficientnet_lite2").preprocessing.resolution
  260
"""

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
