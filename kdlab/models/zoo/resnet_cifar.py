"""CIFAR ResNets of the KD benchmarks (RepDistiller / CRD / mdistiller `resnet.py`).

resnet8 ... resnet110: 16-16-32-64 filters, basic blocks, depth = 6n + 2, three stages.
resnet8x4, resnet32x4: the 4x-wide 32-64-128-256 variants.
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features:
    stem          relu(bn1(conv1(x)))                                 (C0, 32, 32)
    stages        output of layer1, layer2, layer3 (after the last block's ReLU)
    preact_stages the last block's `bn2(conv2(.)) + shortcut`, before that ReLU
    raw_stages    = stages: the ReLU belongs to the stage's last block, nothing follows the
                  stage; mdistiller's and the official ReviewKD code's `feats` are these
                  post-ReLU outputs
    pooled        global average of layer3's output, fed to `fc`
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # out-of-place: the sum is returned as a pre-activation

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.forward_preact(x))


def run_stage(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a stage of blocks with `forward_preact`; returns (post-ReLU, pre-ReLU) output."""
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if i < last:
            x = block(x)
    pre = blocks[last].forward_preact(x)
    return F.relu(pre), pre


class CifarResNet(FeatureClassifier):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, stem)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        pooled = self.avgpool(f3).flatten(1)
        logits = self.fc(pooled)
        return logits, Features([f1, f2, f3], [p1, p2, p3], pooled, stem)


@register_model
def resnet8(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(8, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet14(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(14, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet20(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(20, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet32(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(32, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet44(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(44, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet56(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(56, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet110(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(110, [16, 16, 32, 64], num_classes=num_classes, **kwargs)


@register_model
def resnet8x4(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(8, [32, 64, 128, 256], num_classes=num_classes, **kwargs)


@register_model
def resnet32x4(num_classes: int = 100, **kwargs) -> CifarResNet:
    return CifarResNet(32, [32, 64, 128, 256], num_classes=num_classes, **kwargs)
