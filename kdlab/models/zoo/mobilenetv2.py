"""MobileNetV2 for CIFAR (RepDistiller / mdistiller `mobilenetv2.py`, `mobile_half`).

Expansion 6, width multiplier 0.5, stride-2 stem, 1280-channel final 1x1 conv. Every
inverted residual has the 1x1 expansion conv (also for t=1, as in the reference).
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features (mdistiller `feats[1:]`):
    stem          conv1(x) = relu(bn(conv3x3/2(x)))                    (16, 16, 16)
    stages        outputs of blocks[1], blocks[2], blocks[4], blocks[6] (the last block at
                  each resolution: 12@16x16, 16@8x8, 48@4x4, 160@2x2 for a 32x32 input)
    preact_stages the same tensors: the stages end in a linear bottleneck (no activation)
    raw_stages    the same tensors (mdistiller's `feats`)
    pooled        global average of conv2(blocks[6] output) (1280), fed to `classifier`
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # dw
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2Model(FeatureClassifier):
    #: (expands, c, n, s) per block group; expanding groups use `expansion` (T)
    SETTING = [(False, 16, 1, 1), (True, 24, 2, 1), (True, 32, 3, 2), (True, 64, 4, 2),
               (True, 96, 3, 1), (True, 160, 3, 2), (True, 320, 1, 1)]

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for expands, c, n, s in self.SETTING:
            t = expansion if expands else 1
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](stem))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        pooled = self.avgpool(self.conv2(f4)).flatten(1)
        logits = self.classifier(pooled)
        stages = [f1, f2, f3, f4]
        return logits, Features(stages, list(stages), pooled, stem)


@register_model
def MobileNetV2(num_classes: int = 100, **kwargs) -> MobileNetV2Model:
    return MobileNetV2Model(num_classes=num_classes, **kwargs)
