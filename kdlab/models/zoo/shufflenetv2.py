"""ShuffleNetV2 (1x) for CIFAR (RepDistiller / mdistiller `ShuffleNetv2.py`, `ShuffleV2`).

116-232-464 channels, 3-7-3 basic units after a stride-2 down-sampling unit per stage,
1x1 stem without pooling, final 1x1 conv to 1024 channels.
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features (mdistiller `feats[1:]`; the reference lists no final-conv feature):
    stem          relu(bn1(conv1(x)))                                  (24, 32, 32)
    stages        output of layer1..layer3: the last unit's
                  shuffle(cat[x1, relu(bn3(conv3(.)))])
    preact_stages shuffle(cat[x1, bn3(conv3(.))]) of that unit. mdistiller returns the
                  unshuffled concat; ours is the same tensor with the channel shuffle
                  applied, so that relu(preact) == stage exactly (x1 is itself a ReLU
                  output, so it is unchanged by the ReLU).
    raw_stages    = stages (the ReLU belongs to the unit; mdistiller's and the official
                  ReviewKD code's `feats`)
    pooled        global average of relu(bn2(conv2(layer3 output))) (1024), fed to `linear`
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model

CONFIGS = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward_preact(self, x: Tensor) -> Tensor:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return channel_shuffle(torch.cat([x1, out], 1))

    def forward(self, x: Tensor) -> Tensor:
        # x1 >= 0 (every unit's output is a ReLU output), so this equals the reference's
        # shuffle(cat[x1, relu(bn3(...))]).
        return F.relu(self.forward_preact(x))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


def _run_stage(blocks: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if i < last:
            x = block(x)
    pre = blocks[last].forward_preact(x)
    return F.relu(pre), pre


class ShuffleNetV2(FeatureClassifier):
    def __init__(self, net_size: float = 1, num_classes: int = 100):
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = _run_stage(self.layer1, stem)
        f2, p2 = _run_stage(self.layer2, f1)
        f3, p3 = _run_stage(self.layer3, f2)
        out = F.relu(self.bn2(self.conv2(f3)))
        pooled = self.avgpool(out).flatten(1)
        logits = self.linear(pooled)
        return logits, Features([f1, f2, f3], [p1, p2, p3], pooled, stem)


@register_model
def ShuffleV2(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes, **kwargs)
