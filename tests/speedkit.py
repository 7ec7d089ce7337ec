"""Helpers for the speed tests (GPU pipeline, teacher-output cache, benchmark).

`tiny_model_registered()` registers, for the duration of a `with` block, a very small CIFAR
classifier (`TINY`, ~0.1 MFLOP per 32x32 image) so that building a teacher cache of
every view of a fake dataset takes a fraction of a second. The registration is removed
afterwards, so other test modules never see the model. `write_teacher` saves a kdlab
checkpoint of a freshly initialised model, as `kdlab train` would.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.engine.checkpoint import Checkpoint
from kdlab.models import MODELS
from kdlab.models.features import FeatureClassifier, Features

TINY = "kdlab_speedtest_tiny"


class TinyNet(FeatureClassifier):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        p1 = self.conv1(x)
        f1 = F.relu(p1)
        p2 = self.conv2(f1)
        f2 = F.relu(p2)
        pooled = f2.mean((2, 3))
        return self.fc(pooled) * 3.0, Features([f1, f2], [p1, p2], pooled)  # x3: teacher-like logit scale


def _tiny(num_classes: int = 10, **kwargs) -> TinyNet:
    return TinyNet(num_classes)


@contextlib.contextmanager
def tiny_model_registered():
    with MODELS.registered(TINY, _tiny):  # re-entrant: only the outermost block removes it
        yield TINY


def write_teacher(path: Path, name: str = TINY, num_classes: int = 10, seed: int = 0) -> Path:
    from kdlab.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    Checkpoint.for_model(model, name, num_classes).save(path)
    return path
