"""Hinton KD: CE_weight * CE + KD_weight * T^2 * KL(teacher || student)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.losses import cross_entropy, kd_loss, teacher_target_confidence
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput


class KDConfig(MethodConfig):
    # Defaults are the CIFAR-100 KD baseline of the DKD authors' code.
    name: Literal["kd"] = "kd"
    temperature: Temperature = 4.0
    ce_weight: NonNegativeFloat = 0.1
    kd_weight: NonNegativeFloat = Field(default=0.9, ge=0.0)


@register_method("kd")
class KD(Distiller):
    """Knowledge distillation (Hinton et al., 2015)."""

    Config = KDConfig

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        t_logits = self.teacher_logits(batch)
        logits = self.student(images)
        losses = {
            "ce": self.cfg.ce_weight * cross_entropy(logits, targets),
            "kd": self.cfg.kd_weight * kd_loss(logits, t_logits, self.cfg.temperature),
        }
        return StepOutput(logits, losses, {"teacher_conf": teacher_target_confidence(t_logits, targets)})
