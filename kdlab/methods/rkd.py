"""RKD: ce_weight * CE + rkd_weight * (distance_weight * L_RKD-D + angle_weight * L_RKD-A) on the
two networks' pooled features (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019).

As in the CIFAR-100 benchmarks (RepDistiller `--distill rkd -r 1 -a 0 -b 1`, whose loop feeds
`feat[-1]`, the pooled vector that enters the classifier; mdistiller's RKD the same with
`pooled_feat`; PAPERS.md section 6): CE weight 1, RKD weight 1, distance weight 25, angle
weight 50, no connector (the relations of a batch compare across any two widths). The two
codes agree on everything; mdistiller's options for squared distances and the clamp are
`squared` and `eps` here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.rkd import PDIST_EPS, rkd_terms
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import probe_pair


class RKDConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller -r 1 -a 0 -b 1, RKDLoss(w_d=25, w_a=50));
    # mdistiller RKD: CE_WEIGHT 1, FEAT_WEIGHT 1, DISTANCE_WEIGHT 25, ANGLE_WEIGHT 50,
    # PDIST.EPSILON 1e-12, PDIST.SQUARED False.
    name: Literal["rkd"] = "rkd"
    ce_weight: NonNegativeFloat = 1.0
    rkd_weight: NonNegativeFloat = 1.0  # the benchmarks' -b / FEAT_WEIGHT, on the weighted sum below
    distance_weight: NonNegativeFloat = 25.0
    angle_weight: NonNegativeFloat = 50.0
    squared: bool = False  # squared distances in the distance term (mdistiller PDIST.SQUARED)
    eps: PositiveFloat = PDIST_EPS  # clamp of the squared distance before its square root


@register_method("rkd")
class RKD(Distiller):
    """Relational KD: the student's batch keeps the teacher's distances and angles."""

    Config = RKDConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        probe_pair("rkd", student, teacher, self.input_size)  # pooled features on both sides

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: RKDConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        terms = rkd_terms(s_feats.pooled, t_feats.pooled, cfg.squared, cfg.eps)
        rkd = cfg.distance_weight * terms.distance + cfg.angle_weight * terms.angle
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "rkd": cfg.rkd_weight * rkd,
        }
        stats = {
            "rkd_distance": terms.distance.detach(),  # unweighted
            "rkd_angle": terms.angle.detach(),
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["RKD", "RKDConfig"]
