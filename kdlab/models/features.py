"""The stage-feature contract every kdlab model follows.

Feature-based methods (ReviewKD, FitNet, ...) need, for both networks, each stage's output
*before* and *after* the stage's final activation and the pooled vector that feeds the
classifier. Every model in the zoo is a `FeatureClassifier`:

    logits = model(x)                         # plain classifier, no extra cost
    logits, feats = model(x, features=True)   # feats: Features

Pre-activation tensors are real copies of the values the activation consumed: model code
must not use in-place ops (`relu_`, `+=`, `ReLU(inplace=True)`) on a tensor that is
returned as a pre-activation feature. `tests/test_models.py` checks this for every model.

`feature_info(model, input_size)` is kdlab's one shape probe: the shapes of all of these
from one dummy forward, used to size modules that act on features (ReviewKD's fusion).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdlab.errors import ConfigError


@dataclass
class Features:
    """Intermediate outputs of a classifier, shallow to deep.

    stages: post-activation output of each stage (what the next stage consumes).
    preact_stages: the same stages before their last activation (equal to `stages` for
        stages that end without an activation, such as MobileNetV2's linear bottleneck).
    pooled: the pooled feature vector, shape (B, C), that the classifier head consumes.
    stem: output of the stem (first conv block), when the architecture has one.
    raw_stages: each stage's output as its own blocks produce it, before the normalisation
        and activation that a pre-activation architecture applies *after* the stage (at the
        start of the next stage, or before the pooling). They differ from `stages` only in
        such architectures (kdlab's WRN and DenseNet-BC: raw f_i, `preact_stages` bn(f_i),
        `stages` relu(bn(f_i))); left empty, they are `stages`. These are the `feats` of the
        mdistiller and official ReviewKD model code, the student features their ReviewKD
        fuses on CIFAR. Each zoo file's docstring says what they are for its family.
    """

    stages: list[Tensor]
    preact_stages: list[Tensor]
    pooled: Tensor
    stem: Tensor | None = None
    raw_stages: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.preact_stages):
            raise ValueError("stages and preact_stages must have the same length")
        if not self.raw_stages:
            self.raw_stages = list(self.stages)
        elif len(self.raw_stages) != len(self.stages):
            raise ValueError("raw_stages and stages must have the same length")


@dataclass(frozen=True)
class StageInfo:
    """Shape of one stage output for a given input size (batch dimension excluded)."""

    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class FeatureInfo:
    """Shapes of every stage (post-activation, pre-activation, raw) and of the pooled
    vector, for one input size."""

    stages: tuple[StageInfo, ...]
    pooled_dim: int
    num_classes: int
    input_size: tuple[int, int, int] = field(default=(3, 32, 32))
    preact_stages: tuple[StageInfo, ...] = ()
    raw_stages: tuple[StageInfo, ...] = ()


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
    A model that does not follow the feature contract (does not accept `features=True`,
    does not return `(logits, Features)`, or returns a stage that is not an (N, C, H, W)
    map) is a `ConfigError` naming the model and the way out.
    """
    name = getattr(model, "label", None) or type(model).__name__
    size = tuple(input_size or getattr(model, "default_input_size", (3, 32, 32)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *size, device=device), features=True)
    except TypeError as exc:
        raise ConfigError(
            f"model {name} does not accept model(x, features=True) ({exc}); use a kdlab zoo model or "
            "a tv:/timm: CNN, or wrap it with kdlab.models.adapter.wrap_model (docs/own-model.md)"
        ) from None
    finally:
        model.train(was_training)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Features)):
        raise ConfigError(
            f"model {name} did not return (logits, Features) for features=True; make it a kdlab "
            "FeatureClassifier (docs/own-model.md)"
        )
    logits, feats = out

    def shapes(maps: list[Tensor]) -> tuple[StageInfo, ...]:
        for i, f in enumerate(maps):
            if f.dim() != 4:
                raise ConfigError(
                    f"stage {i + 1} of model {name} has shape {tuple(f.shape)}, not (N, C, H, W); "
                    "stage features are spatial maps (a transformer's token sequence has none): "
                    "use a convolutional model"
                )
        return tuple(StageInfo(*(int(d) for d in f.shape[1:])) for f in maps)

    return FeatureInfo(
        stages=shapes(feats.stages),
        pooled_dim=int(feats.pooled.flatten(1).shape[1]),
        num_classes=int(logits.shape[1]),
        input_size=size,  # type: ignore[arg-type]
        preact_stages=shapes(feats.preact_stages),
        raw_stages=shapes(feats.raw_stages),
    )
