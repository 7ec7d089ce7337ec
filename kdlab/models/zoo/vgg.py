"""VGG with batch norm for CIFAR (RepDistiller / mdistiller `vgg.py`, the `vggN_bn` models).

Five conv blocks; each block is [conv3x3(bias) - BN - ReLU] * k with the last ReLU applied
outside the block, so the block's BN output is available as a pre-activation. Blocks 0-2
are followed by 2x2 max-pools; the pool after block 3 is used only for inputs of height
>= 64 (the reference uses it for 64x64 inputs only), so block 4 runs at 4x4 on CIFAR.
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features (mdistiller `feats[1:]` / `preact_feats[1:]`):
    stem          relu(block0(x))                                      (64, 32, 32)
    stages        relu(block_i(.)) for blocks 1-4, before the following max-pool
    preact_stages block_i(.) (its last BN output), before that ReLU
    raw_stages    = stages: the ReLU is the block's own (kdlab applies it outside the
                  Sequential only to expose the BN output); mdistiller's `feats`
    pooled        global average of relu(block4(.)), fed to `classifier`
"""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model

CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(cfg: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block ends with BN; its ReLU is applied outside


class VGG(FeatureClassifier):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(cfg[0], 3)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        h = x.shape[2]
        stem = F.relu(self.block0(x))
        p1 = self.block1(self.pool0(stem))
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if h >= 64 else f3)
        f4 = F.relu(p4)
        pooled = self.pool4(f4).flatten(1)
        logits = self.classifier(pooled)
        return logits, Features([f1, f2, f3, f4], [p1, p2, p3, p4], pooled, stem)


@register_model
def vgg8(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(CFG["S"], num_classes=num_classes, **kwargs)


@register_model
def vgg11(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(CFG["A"], num_classes=num_classes, **kwargs)


@register_model
def vgg13(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(CFG["B"], num_classes=num_classes, **kwargs)


@register_model
def vgg16(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(CFG["D"], num_classes=num_classes, **kwargs)


@register_model
def vgg19(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(CFG["E"], num_classes=num_classes, **kwargs)
