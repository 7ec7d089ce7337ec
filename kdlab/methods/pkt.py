"""PKT: ce_weight * CE + pkt_weight * probabilistic knowledge transfer on the pooled features
(Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018).

As in the CIFAR-100 benchmarks kdlab reproduces (RepDistiller `--distill pkt -r 1 -a 0 -b 30000`,
which uses `feat[-1]`, and mdistiller's PKT, `pooled_feat`: the same tensor): the pooled vector
each classifier consumes (`Features.pooled`), weight 30000, no KD term. The b x b probability
matrices compare vectors of any two sizes, so any two models with the feature contract pair up;
there are no trainable extras.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.pkt import pkt_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import probe_pair


class PKTConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller run_cifar_distill.sh: -r 1 -a 0 -b 30000);
    # mdistiller CFG.PKT: CE_WEIGHT 1, FEAT_WEIGHT 30000.
    name: Literal["pkt"] = "pkt"
    ce_weight: NonNegativeFloat = 1.0
    pkt_weight: NonNegativeFloat = 30000.0


@register_method("pkt")
class PKT(Distiller):
    """Probabilistic knowledge transfer: the student's cosine-similarity distribution over the
    batch follows the teacher's."""

    Config = PKTConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        probe_pair("pkt", student, teacher, self.input_size)  # a model without features: one ConfigError now

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: PKTConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        pkt = pkt_loss(s_feats.pooled, t_feats.pooled)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "pkt": cfg.pkt_weight * pkt,
        }
        stats = {
            "pkt_loss": pkt.detach(),  # unweighted, to compare across weights
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["PKT", "PKTConfig"]
