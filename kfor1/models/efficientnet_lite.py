"""EfficientNet-Lite0..4: EfficientNet without squeeze-excite, with ReLU6 and a fixed stem/head.

The block table and scaling rules follow TensorFlow's ``efficientnet_lite_builder.py``: widths
scale by ``width_coefficient`` (rounded to multiples of 8), repeats by ``depth_coefficient``
except in the first and last stage, and the 32-channel stem and 1280-channel top are not scaled.
"""

from __future__ import annotations

import math

from kfor1.models.inverted_residual import BlockSpec, InvertedResidualNet

# (repeats, kernel, stride, expand_ratio, in, out) per stage, for width and depth 1.0.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# variant: (width_coefficient, depth_coefficient, resolution, dropout_rate)
VARIANTS = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}


def round_filters(filters: float, multiplier: float, divisor: int = 8) -> int:
    """Scales a channel count and rounds it to a multiple of ``divisor`` (within 10%)."""
    scaled = filters * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(width: float, depth: float) -> tuple[BlockSpec, ...]:
    blocks = []
    for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        if 0 < stage < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        # The first stage's input is the fixed, unscaled 32-channel stem.
        cin = cin if stage == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        for r in range(repeats):
            blocks.append(BlockSpec(cin if r == 0 else cout, cout, expand, kernel,
                                    stride if r == 0 else 1))
    return tuple(blocks)


def efficientnet_lite(variant: int, num_classes: int = 1000, **kwargs) -> InvertedResidualNet:
    """EfficientNet-Lite{variant}; ``kwargs`` override module fields (dtype, dropout_rate, ...)."""
    width, depth, _, dropout = VARIANTS[variant]
    config = dict(
        blocks=block_specs(width, depth),
        stem_features=32,
        top_features=1280,
        num_classes=num_classes,
        dropout_rate=dropout,
        padding="SAME",
        bn_epsilon=1e-3,
        bn_momentum=0.99,
    )
    config.update(kwargs)
    return InvertedResidualNet(**config)
