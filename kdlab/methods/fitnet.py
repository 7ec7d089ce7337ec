"""FitNet: ce_weight * CE + hint_weight * MSE(regressor(student guided stage), teacher hint stage)
(Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015).

As in the CIFAR-100 benchmarks kdlab reproduces (the CRD benchmark, RepDistiller
`--distill hint`, and mdistiller's FitNet; PAPERS.md section 5): one-stage training, CE weight 1
and hint weight 100, hint = stage 2 of both networks (their `HINT_LAYER 2`, whose feature list
starts with the stem: kdlab counts stages from 1 without the stem, so stage 2 is the same
tensor), the stage outputs those codes list as `feats` (`Features.raw_stages`: the activated
stage output for most models, the un-normalised residual sum for pre-activation WRN and
DenseNet), and the reference regressor `ConvReg`. The paper itself trains in two stages
(hints first, then KD); that variant is not implemented.

Both stages are chosen by config (`hint_stage` for the teacher, `guided_stage` for the
student), and the regressor's shape comes from one dummy forward of each model at
construction (`kdlab.models.feature_info`), so any two models with stage features pair up.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveInt
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.losses import cross_entropy, hint_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.methods.connectors import ConvRegressor
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import stage_shape


class FitNetConfig(MethodConfig):
    # Defaults: PAPERS.md section 5 (mdistiller FITNET: CE_WEIGHT 1, FEAT_WEIGHT 100, HINT_LAYER 2;
    # RepDistiller: -r 1 -a 0 -b 100, --hint_layer 2).
    name: Literal["fitnet"] = "fitnet"
    ce_weight: NonNegativeFloat = 1.0
    hint_weight: NonNegativeFloat = 100.0
    hint_stage: PositiveInt = 2  # the teacher's stage whose output is the hint (1 = first stage)
    guided_stage: PositiveInt | None = None  # the student's stage regressed onto it; null: = hint_stage


@register_method("fitnet")
class FitNet(Distiller):
    """FitNets hints: a regressor maps the student's guided stage onto the teacher's hint."""

    Config = FitNetConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: FitNetConfig = cfg  # type: ignore[assignment]
        self.hint_index = c.hint_stage - 1
        self.guided_index = (c.guided_stage or c.hint_stage) - 1
        guided = stage_shape(student, "student", self.guided_index + 1,
                             "guided_stage" if c.guided_stage else "hint_stage", self.input_size)
        hint = stage_shape(teacher, "teacher", self.hint_index + 1, "hint_stage", self.input_size)
        self.regressor = ConvRegressor(guided, hint)

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: FitNetConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        mse = hint_loss(self.regressor(s_feats.raw_stages[self.guided_index]),
                        t_feats.raw_stages[self.hint_index])
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "hint": cfg.hint_weight * mse,
        }
        stats = {
            "hint_mse": mse.detach(),  # unweighted, to compare across hint weights
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["ConvRegressor", "FitNet", "FitNetConfig"]
