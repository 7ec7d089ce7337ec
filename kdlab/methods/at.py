"""AT: ce_weight * CE + at_weight * sum over stage pairs of the attention-transfer loss
(Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR 2017).

As in the CIFAR-100 benchmarks kdlab reproduces (RepDistiller `--distill attention -r 1 -a 0
-b 1000`, which uses `feat[1:-1]`, and mdistiller's AT, `feats[1:]`: the same tensors): every
stage of both networks, paired in order (stem and pooled vector excluded), the tensors those
codes list as `feats` (`Features.raw_stages`), p = 2, weight 1000, no KD term. Where the
references zip two lists of different lengths (silently dropping the extra stages) kdlab
refuses the pair at construction and asks for explicit `student_stages` / `teacher_stages`;
the same options reproduce mdistiller's ImageNet ResNet50 -> MobileNetV1 pairing, whose
student list lacks the stem and is therefore shifted by one stage.

No trainable extras: attention maps compare across channel counts without a connector.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.at import at_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import paired_stages, probe_pair


class ATConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller run_cifar_distill.sh: -r 1 -a 0 -b 1000;
    # Attention(p=2)); mdistiller CFG.AT: P 2, CE_WEIGHT 1, FEAT_WEIGHT 1000.
    name: Literal["at"] = "at"
    ce_weight: NonNegativeFloat = 1.0
    at_weight: NonNegativeFloat = 1000.0
    p: PositiveFloat = 2.0  # attention map = channel mean of A^p
    student_stages: list[PositiveInt] | None = None  # 1-based; null: every stage
    teacher_stages: list[PositiveInt] | None = None  # paired in order with student_stages


@register_method("at")
class AT(Distiller):
    """Attention transfer: the student's normalised spatial attention maps follow the teacher's."""

    Config = ATConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: ATConfig = cfg  # type: ignore[assignment]
        s_info, t_info = probe_pair("at", student, teacher, self.input_size)
        self.student_indices, self.teacher_indices = paired_stages(
            "AT", student, teacher, s_info.raw_stages, t_info.raw_stages, c.student_stages, c.teacher_stages,
            unchosen="every")

    def pairs(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        return [(s_feats[i], t_feats[j]) for i, j in zip(self.student_indices, self.teacher_indices)]

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: ATConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        at = sum(at_loss(s, t, cfg.p) for s, t in self.pairs(s_feats.raw_stages, t_feats.raw_stages))
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "at": cfg.at_weight * at,
        }
        stats = {
            "at_loss": at.detach(),  # unweighted sum over stage pairs
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["AT", "ATConfig"]
