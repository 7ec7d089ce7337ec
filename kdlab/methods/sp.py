"""SP: ce_weight * CE + sp_weight * similarity-preserving loss of one stage pair (Tung, Mori,
"Similarity-Preserving Knowledge Distillation", ICCV 2019).

As in the CIFAR-100 benchmarks kdlab reproduces (RepDistiller `--distill similarity -r 1 -a 0
-b 3000`, which uses `feat[-2]`, and mdistiller's SP, `feats[-1]`: the same tensor): the last
stage of both networks (before pooling), the tensor those codes list as `feats`
(`Features.raw_stages`), weight 3000, no KD term. `student_stage` / `teacher_stage` choose other
stages. The batch similarity matrices are b x b whatever the two maps' shapes, so any two models
with stage features pair up; there are no trainable extras.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.sp import sp_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import stage_shape
from kdlab.models import feature_info


class SPConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller run_cifar_distill.sh: -r 1 -a 0 -b 3000);
    # mdistiller CFG.SP: CE_WEIGHT 1, FEAT_WEIGHT 3000.
    name: Literal["sp"] = "sp"
    ce_weight: NonNegativeFloat = 1.0
    sp_weight: NonNegativeFloat = 3000.0
    student_stage: PositiveInt | None = None  # 1-based; null: the last stage
    teacher_stage: PositiveInt | None = None  # 1-based; null: the last stage


def stage_index(model: nn.Module, role: str, stage: int | None, input_size: tuple[int, ...]) -> int:
    """0-based index into `model`'s raw stages: `stage` (1-based), or the last one when None;
    a ConfigError when the model has no such stage (or no stage features)."""
    if stage is None:
        stage = len(feature_info(model, tuple(input_size)).raw_stages)  # type: ignore[arg-type]
    stage_shape(model, role, stage, f"{role}_stage", input_size)
    return stage - 1


@register_method("sp")
class SP(Distiller):
    """Similarity preserving: the student's batch similarity matrix follows the teacher's."""

    Config = SPConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: SPConfig = cfg  # type: ignore[assignment]
        self.student_index = stage_index(student, "student", c.student_stage, self.input_size)
        self.teacher_index = stage_index(teacher, "teacher", c.teacher_stage, self.input_size)

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: SPConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        sp = sp_loss(s_feats.raw_stages[self.student_index], t_feats.raw_stages[self.teacher_index])
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "sp": cfg.sp_weight * sp,
        }
        stats = {
            "sp_loss": sp.detach(),  # unweighted, to compare across weights
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["SP", "SPConfig", "stage_index"]
