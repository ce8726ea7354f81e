"""EfficientNet-Lite in PyTorch, lukemelas EfficientNet-PyTorch style: the reference network that
kfor1's Flax EfficientNet-Lite is tested against (``tests/test_model_equivalence.py``) and
benchmarked against (``benchmarks/suite/grid.py``).

It is written from the original definitions, not from kfor1: the block table is decoded from
TensorFlow's ``efficientnet_lite_builder.py`` block strings, and the module and parameter names
are lukemelas' (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn0``...), the layout of the
pip-packaged Lite checkpoints, so ``model.load_state_dict(torch.load(path))`` works on them.

Two padding modes, with the same parameters and the same FLOPs:

- ``fast=False`` (default): TensorFlow "SAME" padding, computed from each input's size and applied
  with a separate ``F.pad`` (asymmetric at stride 2 on even inputs), as lukemelas'
  ``Conv2dDynamicSamePadding``. Exact: reproduces the TensorFlow-trained network (and kfor1).
- ``fast=True``: plain ``nn.Conv2d(padding=k // 2)``, padding inside the convolution (no extra
  copy of the activations). Symmetric padding is *not* TensorFlow's SAME at stride 2 (the
  windows shift by one pixel), so the logits differ slightly; it is the fastest eager PyTorch
  form of the same network, for benchmarks.
"""

from __future__ import annotations

import math
import os
import re

import torch

nn = torch.nn
F = torch.nn.functional

# TensorFlow's efficientnet_lite_builder.py: the EfficientNet-B0 block strings, without the
# squeeze-excite ("_se0.25") that Lite removes; and (width, depth, resolution, dropout).
LITE_BLOCK_STRINGS = (
    "r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80", "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
LITE_PARAMS = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}
LITE_STEM, LITE_HEAD = 32, 1280  # Lite fixes the stem and head instead of scaling them.


def tf_round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


def lite_block_table(variant: int) -> list[tuple[int, int, int, int, int]]:
    """(in, out, expand, kernel, stride) per block, decoded from the TF block strings."""
    width, depth = LITE_PARAMS[variant][:2]
    table, cin = [], LITE_STEM
    for i, block in enumerate(LITE_BLOCK_STRINGS):
        opts = dict(re.findall(r"([a-z])(\d+)", block))
        repeats = int(opts["r"])
        if 0 < i < len(LITE_BLOCK_STRINGS) - 1:  # Lite keeps the first and last stage's repeats
            repeats = int(math.ceil(depth * repeats))
        cout = tf_round_filters(int(opts["o"]), width)
        for r in range(repeats):
            stride = int(opts["s"][0]) if r == 0 else 1
            table.append((cin, cout, int(opts["e"]), int(opts["k"]), stride))
            cin = cout
    return table


class Conv2dDynamicSamePadding(nn.Conv2d):
    """lukemelas' TensorFlow-"SAME" convolution: padding computed from each input's size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + kh - ih, 0)
        pad_w = max((ow - 1) * sw + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def lite_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
              fast: bool = False) -> nn.Conv2d:
    """A bias-free convolution: TF-SAME (exact) or, with ``fast``, symmetric ``k // 2`` padding
    inside ``nn.Conv2d``. Both have one ``weight`` of the same shape."""
    if fast:
        return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups,
                         bias=False)
    return Conv2dDynamicSamePadding(cin, cout, kernel, stride, groups)


def lite_bn(channels: int):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class LiteMBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int,
                 fast: bool = False):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = lite_conv(cin, hidden, 1, fast=fast)
            self._bn0 = lite_bn(hidden)
        self._depthwise_conv = lite_conv(hidden, hidden, kernel, stride, hidden, fast=fast)
        self._bn1 = lite_bn(hidden)
        self._project_conv = lite_conv(hidden, cout, 1, fast=fast)
        self._bn2 = lite_bn(cout)
        self.id_skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.id_skip else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite{variant} on NCHW images; ``fast`` picks the padding (module docstring);
    ``dropout_rate`` overrides the variant's."""

    def __init__(self, variant: int, num_classes: int = 1000, *, fast: bool = False,
                 dropout_rate: float | None = None):
        super().__init__()
        table = lite_block_table(variant)
        self.fast = fast
        self._conv_stem = lite_conv(3, LITE_STEM, 3, 2, fast=fast)
        self._bn0 = lite_bn(LITE_STEM)
        self._blocks = nn.ModuleList(LiteMBConvBlock(*block, fast=fast) for block in table)
        self._conv_head = lite_conv(table[-1][1], LITE_HEAD, 1, fast=fast)
        self._bn1 = lite_bn(LITE_HEAD)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        rate = LITE_PARAMS[variant][3] if dropout_rate is None else dropout_rate
        self._dropout = nn.Dropout(rate)
        self._fc = nn.Linear(LITE_HEAD, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def load_lite(
    path: str | os.PathLike,
    variant: int = 0,
    *,
    num_classes: int = 1000,
    fast: bool = False,
    dropout_rate: float | None = None,
    seed: int = 0,
) -> EfficientNetLite:
    """EfficientNet-Lite{variant} with a lukemelas-style checkpoint's weights (strictly loaded).

    ``num_classes`` other than the checkpoint's replaces the classifier by a freshly initialised
    ``nn.Linear`` (seeded), as for a new task.
    """
    model = EfficientNetLite(variant, fast=fast, dropout_rate=dropout_rate)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    if num_classes != model._fc.out_features:
        torch.manual_seed(seed)
        model._fc = nn.Linear(LITE_HEAD, num_classes)
    return model


def bn_and_classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``scale_bias+logits`` patch: every BatchNorm weight and bias, and the classifier."""
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            params += [m.weight, m.bias]
    return params + [model._fc.weight, model._fc.bias]
