"""DenseNet-BC for CIFAR (Huang et al. 2017): densenet100_bc (k=12), densenet190_bc (k=40).

Depth L: (L - 4) / 6 bottleneck layers per dense block, each BN-ReLU-conv1x1(4k)-BN-ReLU-
conv3x3(k) whose output is concatenated to its input; a 3x3 stem conv with 2k channels;
transitions BN-ReLU-conv1x1 (compression 0.5)-avgpool2; final BN-ReLU-pool-linear.

Features (stages are taken *before* each transition, at the dense block's resolution):
    stem          conv1(x) (no BN/ReLU in this stem)                   (2k, 32, 32)
    raw_stages    dense_i output (the concatenation, no BN, no ReLU). Neither mdistiller nor
                  the official ReviewKD code has a DenseNet; by the convention of their
                  other pre-activation family (WRN, whose `feats` are the raw block
                  outputs), the raw dense-block output.
    preact_stages bn(dense_i output), where bn is the BN that consumes it: trans1.bn,
                  trans2.bn and the final bn (the same convention as our WRN)
    stages        relu(preact_stages[i]): what the transition's conv (or the pooling) eats
    pooled        global average of relu(bn(dense3 output)), fed to `fc`
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        inter = bn_size * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2; `forward_activated` takes relu(bn(x)) already computed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward_activated(self, act: Tensor) -> Tensor:
        return self.pool(self.conv(act))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_activated(F.relu(self.bn(x)))


class DenseNetBC(FeatureClassifier):
    def __init__(self, depth: int = 100, growth_rate: int = 12, compression: float = 0.5,
                 num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        for i in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            setattr(self, f"dense{i}", nn.Sequential(*layers))
            if i < 3:
                out = int(math.floor(channels * compression))
                setattr(self, f"trans{i}", Transition(channels, out))
                channels = out
        self.bn = nn.BatchNorm2d(channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = self.conv1(x)
        r1 = self.dense1(stem)
        p1 = self.trans1.bn(r1)
        f1 = F.relu(p1)
        r2 = self.dense2(self.trans1.forward_activated(f1))
        p2 = self.trans2.bn(r2)
        f2 = F.relu(p2)
        r3 = self.dense3(self.trans2.forward_activated(f2))
        p3 = self.bn(r3)
        f3 = F.relu(p3)
        pooled = self.avgpool(f3).flatten(1)
        logits = self.fc(pooled)
        return logits, Features([f1, f2, f3], [p1, p2, p3], pooled, stem, raw_stages=[r1, r2, r3])


@register_model
def densenet100_bc(num_classes: int = 100, **kwargs) -> DenseNetBC:
    return DenseNetBC(depth=100, growth_rate=12, num_classes=num_classes, **kwargs)


@register_model
def densenet190_bc(num_classes: int = 100, **kwargs) -> DenseNetBC:
    return DenseNetBC(depth=190, growth_rate=40, num_classes=num_classes, **kwargs)
