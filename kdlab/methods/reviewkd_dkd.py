"""ReviewKD + DKD: features and logits distilled together, as the DKD authors combined
the two for detection ("ReviewDKD" in their code):

    ce_weight * CE + warmup(epoch) * (weight * sum_j HCL_j + alpha * TCKD + beta * NCKD)

One teacher forward feeds both: its pre-activation stages for the fusion features, its
logits for DKD. One warm-up ramps both terms (both methods ramp over 20 epochs on CIFAR).
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat
from torch import Tensor

from kdlab.schema.experiment import Temperature
from kdlab.losses import dkd_terms
from kdlab.methods import register_method
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.reviewkd import ReviewKD, ReviewKDConfig


class ReviewKDDKDConfig(ReviewKDConfig):
    # DKD defaults: the DKD paper's CIFAR-100 ResNet32x4 -> ResNet8x4 setting.
    name: Literal["reviewkd_dkd"] = "reviewkd_dkd"  # type: ignore[assignment]
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 8.0
    temperature: Temperature = 4.0


@register_method("reviewkd_dkd")
class ReviewKDDKD(ReviewKD):
    """ReviewKD's fusion features plus DKD's decoupled logit terms."""

    Config = ReviewKDDKDConfig

    def logit_losses(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor, warm: float
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cfg: ReviewKDDKDConfig = self.cfg  # type: ignore[assignment]
        parts = dkd_terms(logits, teacher_logits, targets, cfg.temperature)
        losses = {
            "tckd": warm * cfg.alpha * parts.tckd.mean(),
            "nckd": warm * cfg.beta * parts.nckd.mean(),
        }
        stats = {
            "teacher_conf": teacher_target_confidence(teacher_logits, targets),
            "tckd": parts.tckd.detach().mean(),
            "nckd": parts.nckd.detach().mean(),
        }
        return losses, stats


__all__ = ["ReviewKDDKD", "ReviewKDDKDConfig"]
