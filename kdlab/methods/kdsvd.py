"""KDSVD: ce_weight * CE + kdsvd_weight * KDSVD(student stages, teacher stages) (Lee, Kim, Song,
"Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018), as the DKD
authors' mdistiller runs it (`distillers/KDSVD.py`, `CFG.KDSVD`: K 1, CE_WEIGHT 1, FEAT_WEIGHT 1).

Stages: stage i of the student with stage i of the teacher for every stage both have (mdistiller
zips `feats[1:]`, the stage outputs after the stem: kdlab's `Features.raw_stages`). The loss
(`kdlab.losses.kdsvd`) aligns right singular vectors of length W, the map width, so every zipped
pair of stages must have equal widths: a pair without (ResNet32x4 -> ShuffleNetV2, whose stages are
half the teacher's size; VGG13 -> MobileNetV2, whose last stage is 2x2 against 4x4) is refused at
construction, where mdistiller fails at its first step. No connector, nothing trained besides the
student. No published CIFAR-100 number exists for it (PAPERS.md section 6).
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.kdsvd import KDSVD_K, kdsvd_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import model_name, probe_pair


class KDSVDConfig(MethodConfig):
    # Defaults: mdistiller CFG.KDSVD (K 1, LOSS.CE_WEIGHT 1, LOSS.FEAT_WEIGHT 1).
    name: Literal["kdsvd"] = "kdsvd"
    ce_weight: NonNegativeFloat = 1.0
    kdsvd_weight: NonNegativeFloat = 1.0
    k: PositiveInt = KDSVD_K  # teacher singular vectors kept (the student keeps k + 3)


@register_method("kdsvd")
class KDSVD(Distiller):
    """Self-supervised KD with SVD: the RBF of consecutive stages' leading singular vectors."""

    Config = KDSVDConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        s_info, t_info = probe_pair("kdsvd", student, teacher, self.input_size)
        pair = f"{model_name(teacher)} -> {model_name(student)}"
        stages = list(zip(s_info.raw_stages, t_info.raw_stages))
        if len(stages) < 2:
            raise ConfigError(
                f"method kdsvd cannot distil {pair}: its loss relates consecutive stages and the two "
                f"networks share {len(stages)}; use models with at least two stages"
            )
        widths = [(i + 1, s.width, t.width) for i, (s, t) in enumerate(stages)]
        if any(ws != wt for _, ws, wt in widths):
            listed = ", ".join(f"stage {i}: {ws} vs {wt}" for i, ws, wt in widths)
            raise ConfigError(
                f"method kdsvd cannot distil {pair} at input size {tuple(self.input_size)}: it aligns the "
                f"stage maps' right singular vectors, whose length is the map width, and the widths "
                f"differ (student vs teacher, {listed}); choose a pair whose stages have equal sizes"
            )

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: KDSVDConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        svd = kdsvd_loss(s_feats.raw_stages, t_feats.raw_stages, cfg.k)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "kdsvd": cfg.kdsvd_weight * svd,
        }
        stats = {"kdsvd": svd.detach(), "teacher_conf": teacher_target_confidence(t_logits, batch.targets)}
        return StepOutput(logits, losses, stats)


__all__ = ["KDSVD", "KDSVDConfig"]
