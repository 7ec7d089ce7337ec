"""Plain supervised training (no teacher): teachers and the "student alone" baseline."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput


class VanillaConfig(MethodConfig):
    name: Literal["vanilla"] = "vanilla"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)


@register_method("vanilla")
class Vanilla(Distiller):
    """Cross-entropy only."""

    Config = VanillaConfig
    requires_teacher = False

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        logits = self.student(images)
        return StepOutput(logits, {"ce": cross_entropy(logits, targets, self.cfg.label_smoothing)}, {})
