"""CC: ce_weight * CE + cc_weight * L_CC(embed_s(student pooled), embed_t(teacher pooled))
(Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019), as in the CRD
benchmark (RepDistiller `--distill correlation -r 1 -a 0 -b 0.02`; PAPERS.md section 6).

As RepDistiller's `train_student.py` builds it: each network's pooled vector (`feat[-1]`, kdlab's
`Features.pooled`) goes through its own `LinearEmbed` (a linear layer with bias to `--feat_dim`
128, no normalisation); both embeddings are trained with the student (the teacher's embedding
too: it is in RepDistiller's optimizer), the teacher itself is not. The loss is the shared code's
`Correlation` (`kdlab.losses.cc`). mdistiller has no CC.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.cc import cc_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import probe_pair


class CCConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller --distill correlation -r 1 -a 0 -b 0.02, --feat_dim 128).
    name: Literal["cc"] = "cc"
    ce_weight: NonNegativeFloat = 1.0
    cc_weight: NonNegativeFloat = 0.02
    feat_dim: PositiveInt = 128  # the width of both embeddings


@register_method("cc")
class CC(Distiller):
    """Correlation congruence between linear embeddings of the two pooled features."""

    Config = CCConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: CCConfig = cfg  # type: ignore[assignment]
        s_info, t_info = probe_pair("cc", student, teacher, self.input_size)
        self.embed_s = nn.Linear(s_info.pooled_dim, c.feat_dim)
        self.embed_t = nn.Linear(t_info.pooled_dim, c.feat_dim)

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: CCConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        cc = cc_loss(self.embed_s(s_feats.pooled.flatten(1)), self.embed_t(t_feats.pooled.flatten(1)))
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "cc": cfg.cc_weight * cc,
        }
        stats = {"cc": cc.detach(), "teacher_conf": teacher_target_confidence(t_logits, batch.targets)}
        return StepOutput(logits, losses, stats)


__all__ = ["CC", "CCConfig"]
