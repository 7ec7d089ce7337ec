"""The stage-feature contract every kdlab model follows.

Feature-based methods (ReviewKD, and any future FitNet-style method) need, for both
networks, each stage's output *before* and *after* the stage's final activation and the
pooled vector that feeds the classifier. Every model in the zoo is a `FeatureClassifier`:

    logits = model(x)                         # plain classifier, no extra cost
    logits, feats = model(x, features=True)   # feats: Features

Pre-activation tensors are real copies of the values the activation consumed: model code
must not use in-place ops (`relu_`, `+=`, `ReLU(inplace=True)`) on a tensor that is
returned as a pre-activation feature. `tests/test_models.py` checks this for every model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Features:
    """Intermediate outputs of a classifier, shallow to deep.

    stages: post-activation output of each stage (what the next stage consumes).
    preact_stages: the same stages before their last activation (equal to `stages` for
        stages that end without an activation, such as MobileNetV2's linear bottleneck).
    pooled: the pooled feature vector, shape (B, C), that the classifier head consumes.
    stem: output of the stem (first conv block), when the architecture has one.
    """

    stages: list[Tensor]
    preact_stages: list[Tensor]
    pooled: Tensor
    stem: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.preact_stages):
            raise ValueError("stages and preact_stages must have the same length")


@dataclass(frozen=True)
class StageInfo:
    """Shape of one stage output for a given input size (batch dimension excluded)."""

    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class FeatureInfo:
    """Shapes of every stage and of the pooled vector, for one input size."""

    stages: tuple[StageInfo, ...]
    pooled_dim: int
    num_classes: int
    input_size: tuple[int, int, int] = field(default=(3, 32, 32))


class FeatureClassifier(nn.Module):
    """Base class of kdlab models: `forward(x, features=False)`.

    Subclasses implement `forward_features(x) -> (logits, Features)`. The default
    `forward` drops the features, so asking for none costs only the Python list building
    of one forward (the tensors are intermediates the forward computes anyway).
    Subclasses may override `forward` with a leaner path when that matters.
    """

    #: (C, H, W) the architecture was designed for; used for dummy forwards.
    default_input_size: tuple[int, int, int] = (3, 32, 32)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor, features: bool = False):
        logits, feats = self.forward_features(x)
        return (logits, feats) if features else logits


@torch.no_grad()
def feature_info(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> FeatureInfo:
    """Channel counts and spatial sizes of `model`'s stages, from one dummy forward.

    The forward runs in eval mode on a batch of 2 zeros on the model's device; the
    model's training mode is restored afterwards, so batch-norm statistics are untouched.
    """
    size = tuple(input_size or getattr(model, "default_input_size", (3, 32, 32)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        logits, feats = model(torch.zeros(2, *size, device=device), features=True)
    finally:
        model.train(was_training)
    stages = tuple(StageInfo(f.shape[1], f.shape[2], f.shape[3]) for f in feats.stages)
    return FeatureInfo(stages, int(feats.pooled.shape[1]), int(logits.shape[1]), size)  # type: ignore[arg-type]
