"""Wide ResNets for CIFAR (RepDistiller / mdistiller `wrn.py`): wrn_{16,40}_{1,2}.

Pre-activation blocks (BN-ReLU-conv), so a stage's raw output is a residual sum that the
next stage normalises and activates first (`next_block.bn1`, then ReLU); the last stage is
followed by the final `bn1` + ReLU. Module names follow the reference, so its checkpoints
load with `load_state_dict`.

Features:
    stem          conv1(x) (no BN/ReLU in this stem)                   (16, 32, 32)
    raw_stages    f_i, block_i's raw output (the residual sum, no BN, no ReLU): exactly
                  mdistiller's and the official ReviewKD code's `feats[1:]`, the student
                  features both feed ReviewKD's fusion for a WRN student.
    preact_stages bn(f_i), where bn is the BN that consumes it: block2.layer[0].bn1,
                  block3.layer[0].bn1, and the final bn1. These are exactly mdistiller's
                  `preact_feats[1:]` (the teacher features of ReviewKD).
    stages        relu(preact_stages[i]): the activated tensor the next stage (or the
                  pooling) really consumes; the last one is the output after the final
                  bn+relu.
    pooled        global average of relu(bn1(f_3)), fed to `fc`
The activation is computed once and handed to the next stage, so features cost nothing.
"""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward_activated(self, act: Tensor, x: Tensor) -> Tensor:
        """The block's output given its input `x` and `act = relu(bn1(x))`."""
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_activated(F.relu(self.bn1(x)), x)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward_activated(self, act: Tensor, x: Tensor) -> Tensor:
        """Run the stage when its first block's `relu(bn1(x))` is already computed."""
        out = self.layer[0].forward_activated(act, x)
        for i in range(1, len(self.layer)):
            out = self.layer[i](out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(FeatureClassifier):
    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = self.conv1(x)
        r1 = self.block1(stem)
        p1 = self.block2.layer[0].bn1(r1)
        f1 = F.relu(p1)
        r2 = self.block2.forward_activated(f1, r1)
        p2 = self.block3.layer[0].bn1(r2)
        f2 = F.relu(p2)
        r3 = self.block3.forward_activated(f2, r2)
        p3 = self.bn1(r3)
        f3 = F.relu(p3)
        pooled = self.avgpool(f3).flatten(1)
        logits = self.fc(pooled)
        return logits, Features([f1, f2, f3], [p1, p2, p3], pooled, stem, raw_stages=[r1, r2, r3])


@register_model
def wrn_16_1(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(16, num_classes=num_classes, widen_factor=1, **kwargs)


@register_model
def wrn_16_2(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(16, num_classes=num_classes, widen_factor=2, **kwargs)


@register_model
def wrn_40_1(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(40, num_classes=num_classes, widen_factor=1, **kwargs)


@register_model
def wrn_40_2(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(40, num_classes=num_classes, widen_factor=2, **kwargs)
