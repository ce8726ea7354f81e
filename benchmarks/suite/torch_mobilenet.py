"""MobileNetV2 in PyTorch, as torchvision defines it: the reference network that kfor1's Flax
MobileNetV2 (torchvision flavour) is tested against (``tests/test_model_equivalence.py``) and
benchmarked against (``benchmarks/suite/grid.py --model mobilenet_v2``).

Written from torchvision's ``mobilenetv2.py`` (module and parameter names included, so
torchvision's checkpoint ``mobilenet_v2-b0353104.pth`` loads strictly), without importing
torchvision, which kfor1 does not depend on. Its padding is inside each ``nn.Conv2d``
(symmetric ``(k - 1) // 2``), which is torchvision's own definition: the fastest eager PyTorch
form and the exact network at once.
"""

from __future__ import annotations

import os

import torch

nn = torch.nn
F = torch.nn.functional


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's _make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),  # eps 1e-5
            nn.ReLU6(inplace=True),
        )


class TorchvisionInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TorchvisionMobileNetV2(nn.Module):
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        super().__init__()
        channels = make_divisible(32 * width_mult)
        last_channel = make_divisible(1280 * max(1.0, width_mult))
        features = [Conv2dNormActivation(3, channels, stride=2)]
        for t, c, n, s in self.SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(TorchvisionInvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(Conv2dNormActivation(channels, last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def load_mobilenet_v2(
    path: str | os.PathLike, *, num_classes: int = 1000, dropout_rate: float | None = None,
    seed: int = 0,
) -> TorchvisionMobileNetV2:
    """MobileNetV2 1.0 with a torchvision checkpoint's weights (strictly loaded); a
    ``num_classes`` other than 1000 replaces the classifier by a fresh, seeded ``nn.Linear``."""
    model = TorchvisionMobileNetV2(1.0)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    if dropout_rate is not None:
        model.classifier[0].p = dropout_rate
    if num_classes != model.classifier[1].out_features:
        torch.manual_seed(seed)
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, num_classes)
    return model


def bn_and_classifier_parameters(model: TorchvisionMobileNetV2) -> list[nn.Parameter]:
    """The ``scale_bias+logits`` patch: every BatchNorm weight and bias, and the classifier."""
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            params += [m.weight, m.bias]
    return params + [model.classifier[1].weight, model.classifier[1].bias]
