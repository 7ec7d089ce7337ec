"""NST: ce_weight * CE + nst_weight * sum over stage pairs of the neuron-selectivity-transfer
loss (Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017).

As in the CIFAR-100 benchmarks kdlab reproduces (RepDistiller `--distill nst -r 1 -a 0 -b 50`,
which uses `feat[1:-1]`, and mdistiller's NST, `feats[1:]`: the same tensors): every stage of
both networks, paired in order, the tensors those codes list as `feats` (`Features.raw_stages`),
weight 50, no KD term. Pairing, the refusal of unequal stage counts and the `student_stages` /
`teacher_stages` options are AT's (`kdlab.methods.stages.paired_stages`). No trainable extras: the
MMD compares channel sets of any sizes.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy
from kdlab.losses.nst import nst_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import paired_stages, probe_pair


class NSTConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller run_cifar_distill.sh: -r 1 -a 0 -b 50);
    # mdistiller CFG.NST: CE_WEIGHT 1, FEAT_WEIGHT 50.
    name: Literal["nst"] = "nst"
    ce_weight: NonNegativeFloat = 1.0
    nst_weight: NonNegativeFloat = 50.0
    student_stages: list[PositiveInt] | None = None  # 1-based; null: every stage
    teacher_stages: list[PositiveInt] | None = None  # paired in order with student_stages


@register_method("nst")
class NST(Distiller):
    """Neuron selectivity transfer: the student's distribution of channel activation patterns
    follows the teacher's (squared MMD, polynomial kernel)."""

    Config = NSTConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: NSTConfig = cfg  # type: ignore[assignment]
        s_info, t_info = probe_pair("nst", student, teacher, self.input_size)
        self.student_indices, self.teacher_indices = paired_stages(
            "NST", student, teacher, s_info.raw_stages, t_info.raw_stages, c.student_stages, c.teacher_stages,
            unchosen="every")

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: NSTConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        nst = sum(nst_loss(s_feats.raw_stages[i], t_feats.raw_stages[j])
                  for i, j in zip(self.student_indices, self.teacher_indices))
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "nst": cfg.nst_weight * nst,
        }
        stats = {
            "nst_loss": nst.detach(),  # unweighted sum over stage pairs
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["NST", "NSTConfig"]
