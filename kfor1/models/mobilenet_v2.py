"""MobileNetV2 (Sandler et al. 2018), the base network of the K-for-the-price-of-1 paper.

Any width multiplier and input resolution. ``padding='SAME'`` and BatchNorm epsilon 1e-3 match
Keras (and the paper's TensorFlow weights); ``padding='SYMMETRIC'`` and 1e-5 match torchvision.
"""

from __future__ import annotations

from kfor1.models.efficientnet_lite import round_filters
from kfor1.models.inverted_residual import BlockSpec, InvertedResidualNet

# (expand_ratio, out_channels, repeats, stride) per stage, for width 1.0.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def block_specs(width: float) -> tuple[BlockSpec, ...]:
    blocks = []
    cin = round_filters(32, width)
    for expand, cout, repeats, stride in STAGES:
        cout = round_filters(cout, width)
        for r in range(repeats):
            blocks.append(BlockSpec(cin, cout, expand, 3, stride if r == 0 else 1))
            cin = cout
    return tuple(blocks)


def mobilenet_v2(
    width: float = 1.0, num_classes: int = 1000, flavor: str = "keras", **kwargs
) -> InvertedResidualNet:
    """MobileNetV2 with width multiplier ``width``; ``flavor`` 'keras' or 'torchvision'."""
    if not 0.1 <= width <= 2.0:
        raise ValueError(f"MobileNetV2 width multiplier must be in [0.1, 2.0], got {width}")
    if flavor not in ("keras", "torchvision"):
        raise ValueError(f"MobileNetV2 flavor must be 'keras' or 'torchvision', got {flavor!r}")
    keras = flavor == "keras"
    config = dict(
        blocks=block_specs(width),
        stem_features=round_filters(32, width),
        top_features=round_filters(1280, max(1.0, width)),
        num_classes=num_classes,
        dropout_rate=0.0 if keras else 0.2,
        padding="SAME" if keras else "SYMMETRIC",
        bn_epsilon=1e-3 if keras else 1e-5,
        bn_momentum=0.999 if keras else 0.9,
    )
    config.update(kwargs)
    return InvertedResidualNet(**config)
