"""kfor1: K for the price of 1 — parameter-efficient transfer and multi-task learning in JAX.

Public API:
- ``kfor1.models``: pretrained backbones (EfficientNet-Lite, MobileNetV2) and weight import;
- ``kfor1.layers``: backend-chosen depthwise and 1x1 convolutions.
"""

from kfor1 import layers, models
from kfor1.models import Pretrained, create, load_pretrained

__version__ = "0.1.0"

__all__ = ["Pretrained", "create", "layers", "load_pretrained", "models", "__version__"]
