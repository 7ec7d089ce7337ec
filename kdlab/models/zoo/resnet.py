"""ResNet18/34/50 for CIFAR (RepDistiller / mdistiller `resnetv2.py`).

64-128-256-512 planes, 3x3 stride-1 stem without max-pool, four stages.
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features:
    stem          relu(bn1(conv1(x)))                                  (64, 32, 32)
    stages        output of layer1..layer4 (after the last block's ReLU)
    preact_stages the last block's `bn(conv(.)) + shortcut`, before that ReLU
    raw_stages    = stages (the ReLU belongs to the block; mdistiller's `feats`)
    pooled        global average of layer4's output, fed to `linear`
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward_preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.forward_preact(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward_preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.forward_preact(x))


def _run_stage(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if i < last:
            x = block(x)
    pre = blocks[last].forward_preact(x)
    return F.relu(pre), pre


class ResNet(FeatureClassifier):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: list[int],
                 num_classes: int = 100, zero_init_residual: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = _run_stage(self.layer1, stem)
        f2, p2 = _run_stage(self.layer2, f1)
        f3, p3 = _run_stage(self.layer3, f2)
        f4, p4 = _run_stage(self.layer4, f3)
        pooled = self.avgpool(f4).flatten(1)
        logits = self.linear(pooled)
        return logits, Features([f1, f2, f3, f4], [p1, p2, p3, p4], pooled, stem)


@register_model
def ResNet18(num_classes: int = 100, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


@register_model
def ResNet34(num_classes: int = 100, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model
def ResNet50(num_classes: int = 100, **kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
