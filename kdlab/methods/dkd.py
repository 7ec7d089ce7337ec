"""DKD: ce_weight * CE + warmup(epoch) * (alpha * TCKD + beta * NCKD) (Zhao et al., CVPR 2022).

`terms` selects the ablations of the paper's Table 1 (the loss weights are alpha and beta):

    dkd            alpha * TCKD + beta * NCKD                  (the method, Sec. 3.3)
    tckd           alpha * TCKD                                (TCKD alone)
    nckd           beta * NCKD                                 (NCKD alone, not suppressed by 1 - p_t)
    kd_decomposed  TCKD + (1 - p_t^T) * NCKD, per sample       (classic KD written as its two
                                                                terms: equals `kd_loss` exactly)

The warm-up multiplies the whole distillation term in every mode, as in the reference code.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import NonNegativeFloat, NonNegativeInt, model_validator
from torch import Tensor

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.losses import cross_entropy, dkd_terms
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput, warmup_factor
from kdlab.losses.kd import teacher_target_confidence

Terms = Literal["dkd", "tckd", "nckd", "kd_decomposed"]


class DKDConfig(MethodConfig):
    # Defaults: the paper's CIFAR-100 setting for ResNet32x4 -> ResNet8x4 (mdistiller's defaults).
    name: Literal["dkd"] = "dkd"
    ce_weight: NonNegativeFloat = 1.0
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 8.0
    temperature: Temperature = 4.0
    warmup_epochs: NonNegativeInt = 20
    terms: Terms = "dkd"

    @model_validator(mode="before")
    @classmethod
    def _kd_decomposed_weights(cls, data: Any) -> Any:
        # kd_decomposed is classic KD itself, whose TCKD/NCKD weights are fixed (1 and
        # 1 - p_t): alpha and beta default to 1 there, and any other value is a mistake
        # rather than something to ignore silently.
        if not isinstance(data, dict) or data.get("terms") != "kd_decomposed":
            return data
        data = dict(data)
        for key in ("alpha", "beta"):
            value = data.setdefault(key, 1.0)
            if value != 1 and value != 1.0:
                raise ValueError(
                    f"method.terms='kd_decomposed' is classic KD (TCKD + (1 - p_t) * NCKD) with fixed "
                    f"weights, but method.{key}={value!r}; set method.{key}=1 (or remove it), or use "
                    "method.terms=dkd to weight the terms freely"
                )
        return data


@register_method("dkd")
class DKD(Distiller):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang; CVPR 2022)."""

    Config = DKDConfig

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        cfg: DKDConfig = self.cfg  # type: ignore[assignment]
        t_logits = self.teacher_logits(batch)
        logits = self.student(images)
        parts = dkd_terms(logits, t_logits, targets, cfg.temperature)
        warm = warmup_factor(epoch, cfg.warmup_epochs)
        losses = {"ce": cfg.ce_weight * cross_entropy(logits, targets)}
        if cfg.terms in ("dkd", "tckd"):
            losses["tckd"] = warm * cfg.alpha * parts.tckd.mean()
        if cfg.terms in ("dkd", "nckd"):
            losses["nckd"] = warm * cfg.beta * parts.nckd.mean()
        if cfg.terms == "kd_decomposed":
            losses["tckd"] = warm * parts.tckd.mean()
            losses["nckd"] = warm * (parts.teacher_non_target_prob * parts.nckd).mean()
        stats = {
            "teacher_conf": teacher_target_confidence(t_logits, targets),
            # Unweighted (no alpha/beta/warm-up), so the raw size of each term is visible.
            "tckd": parts.tckd.detach().mean(),
            "nckd": parts.nckd.detach().mean(),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["DKD", "DKDConfig"]
