"""Custom models for the adapter and DDP tests, named in configs as `py:<this file>:<function>`.

`SmallNet` is a plain nn.Module (no kdlab base class) with in-place activations and an
in-place residual add, the patterns that corrupt naively hooked features, and no batch
norm (so a 2-process run can match a single-process run exactly: see tests/test_ddp.py).
"""
from __future__ import annotations

import torch
from torch import nn

from kdlab.models.adapter import wrap_model


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv1(x))
        out = self.conv2(out)
        out += self.skip(x)  # in place, like torchvision's ResNet blocks
        return self.act(out)  # the same in-place ReLU module, called a second time


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(inplace=True))
        self.block1 = Block(width, width, 1)
        self.block2 = Block(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_net(num_classes: int = 10, width: int = 8):
    """The config entry point: `model: {name: "py:tests/custom_nets.py:small_net"}`."""
    return wrap_model(
        SmallNet(num_classes, width),
        stages=["block1", "block2"],
        preact=["block1.act", "block2.act"],
        classifier="fc",
        input_size=(3, 16, 16),
    )


def not_wrapped(num_classes: int = 10):
    return SmallNet(num_classes)
