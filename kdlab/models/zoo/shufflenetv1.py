"""ShuffleNetV1 for CIFAR (RepDistiller / mdistiller `ShuffleNetv1.py`, `ShuffleV1`).

Groups 3, 240-480-960 channels, 4-8-4 blocks, 1x1 stem without pooling. The first block
of each stage has stride 2 and concatenates an avg-pooled shortcut; the others add it.
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features (mdistiller `feats[1:]` / `preact_feats[1:]`):
    stem          relu(bn1(conv1(x)))                                  (24, 32, 32)
    stages        output of layer1..layer3 (after the last block's ReLU)
    preact_stages the last block's `bn3(conv3(.)) + shortcut` before that ReLU
    raw_stages    = stages (the ReLU belongs to the unit; mdistiller's and the official
                  ReviewKD code's `feats`)
    pooled        global average of layer3's output (960), fed to `linear`
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the first block sees the 24-channel stem
        self.shuffle_groups = g
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward_preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.forward_preact(x))


def _run_stage(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if i < last:
            x = block(x)
    pre = blocks[last].forward_preact(x)
    return F.relu(pre), pre


class ShuffleNetV1(FeatureClassifier):
    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # stride-2 blocks concat the input
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = _run_stage(self.layer1, stem)
        f2, p2 = _run_stage(self.layer2, f1)
        f3, p3 = _run_stage(self.layer3, f2)
        pooled = self.avgpool(f3).flatten(1)
        logits = self.linear(pooled)
        return logits, Features([f1, f2, f3], [p1, p2, p3], pooled, stem)


@register_model
def ShuffleV1(num_classes: int = 100, **kwargs) -> ShuffleNetV1:
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes, **kwargs)
