"""Tolerant teachers and training in generations (Yang, Xie, Qiao, Yuille, arXiv 1805.05551).

Two methods:

- `tolerant`: the patriarch (generation 0, no teacher). `kind` picks how strict it is:
  `strict` (cross-entropy), `tsd` (eta * CE + (1 - eta) * top-score difference, the paper's
  tolerant teacher in kdlab's reading), `label_smoothing` or `confidence_penalty` (the two
  alternatives the paper compares).
- `generation`: generation m >= 1, taught by generation m - 1 of the same architecture:
  (1 - lam) * CE + lam * tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)). This is Hinton
  KD with ce_weight = 1 - lam, kd_weight = lam, temperature = tau; a separate method so that
  configs and reports speak the paper's D(eta, lam) notation.

`kdlab generations CONFIG` (kdlab.generations) chains them; see docs/tolerant.md.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, ValidationInfo, field_validator
from torch import Tensor

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy, kd_loss
from kdlab.losses.tolerant import (
    check_eta,
    label_smoothing_loss,
    prediction_entropy,
    tsd_terms,
)
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence

PatriarchKind = Literal["strict", "tsd", "label_smoothing", "confidence_penalty"]


class TolerantConfig(MethodConfig):
    """The patriarch's loss. Only the fields of the chosen `kind` are used."""

    name: Literal["tolerant"] = "tolerant"
    kind: PatriarchKind = Field(default="tsd", description="strict | tsd | label_smoothing | confidence_penalty")
    # `scores` precedes `eta` so that eta's validator can see it.
    # Default probabilities: on real data the logit form gives a far weaker, near-flat patriarch
    # (docs/tolerant.md, "Which TSD form").
    scores: Literal["logits", "probabilities"] = Field(default="probabilities", description="tsd: scores compared")
    eta: float = Field(default=0.6, gt=0.0, le=1.0, description="tsd: weight of CE; 1 - eta weighs TSD")
    k: int = Field(default=5, ge=2, description="tsd: primary + (k - 1) secondary classes")
    primary: Literal["target", "top1"] = Field(default="target", description="tsd: the primary class")
    smoothing: float = Field(default=0.1, ge=0.0, lt=1.0, description="label_smoothing: epsilon")
    penalty: NonNegativeFloat = Field(default=0.1, description="confidence_penalty: entropy weight beta")

    @field_validator("eta")
    @classmethod
    def _eta_has_minimum(cls, eta: float, info: ValidationInfo) -> float:
        if info.data.get("kind", "tsd") == "tsd":
            check_eta(eta, info.data.get("scores", "logits"))  # ValueError -> error at method.eta
        return eta


@register_method("tolerant")
class Tolerant(Distiller):
    """The patriarch: trained alone with a strict or a softened loss."""

    Config = TolerantConfig
    requires_teacher = False

    def __init__(self, student, teacher, cfg: TolerantConfig, *, input_size=(3, 32, 32), num_classes=None):
        super().__init__(student, None, cfg, input_size=input_size, num_classes=num_classes)
        if cfg.kind == "tsd" and num_classes is not None and cfg.k > num_classes:
            raise ConfigError(
                f"method.k={cfg.k} is larger than the {num_classes} classes of this dataset; "
                f"set method.k (chain.patriarch.k in a generations config) to at most {num_classes} (the paper uses 5)"
            )

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        cfg = self.cfg
        logits = self.student(images)
        stats = {"target_conf": teacher_target_confidence(logits.detach(), targets)}
        if cfg.kind == "strict":
            losses = {"ce": cross_entropy(logits, targets)}
        elif cfg.kind == "tsd":
            primary, secondary = tsd_terms(logits, targets, cfg.k, cfg.scores, cfg.primary)
            tsd = (primary - secondary).mean()
            losses = {"ce": cfg.eta * cross_entropy(logits, targets), "tsd": (1.0 - cfg.eta) * tsd}
            stats["tsd"] = tsd.detach()
        elif cfg.kind == "label_smoothing":
            losses = {"ce": label_smoothing_loss(logits, targets, cfg.smoothing)}
        else:  # confidence_penalty_loss = CE - beta * H(p), split into two terms for the logs
            entropy = prediction_entropy(logits)
            losses = {"ce": cross_entropy(logits, targets), "entropy": -cfg.penalty * entropy}
            stats["entropy"] = entropy.detach()
        return StepOutput(logits, losses, stats)


class GenerationConfig(MethodConfig):
    """Generation m >= 1: (1 - lam) * CE + lam * tau^2 * KL(teacher || student)."""

    name: Literal["generation"] = "generation"
    lam: float = Field(default=0.6, ge=0.0, le=1.0, description="weight of the teacher term (lambda)")
    tau: Temperature = Field(default=1.0, description="temperature of the teacher term")


@register_method("generation")
class Generation(Distiller):
    """A student of the previous generation (same architecture)."""

    Config = GenerationConfig

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        cfg = self.cfg
        logits = self.student(images)
        if cfg.lam == 0.0:
            # D(eta, 0.0): no teacher term, so skip the teacher's forward pass entirely.
            return StepOutput(logits, {"ce": cross_entropy(logits, targets)}, {})
        t_logits = self.teacher_logits(batch)
        losses = {
            "ce": (1.0 - cfg.lam) * cross_entropy(logits, targets),
            "kd": cfg.lam * kd_loss(logits, t_logits, cfg.tau),
        }
        return StepOutput(logits, losses, {"teacher_conf": teacher_target_confidence(t_logits, targets)})
