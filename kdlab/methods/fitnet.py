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
from torch import Tensor, nn

from kdlab.config.schema import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy, hint_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.methods.kd import teacher_target_confidence
from kdlab.models import StageInfo, feature_info


class FitNetConfig(MethodConfig):
    # Defaults: PAPERS.md section 5 (mdistiller FITNET: CE_WEIGHT 1, FEAT_WEIGHT 100, HINT_LAYER 2;
    # RepDistiller: -r 1 -a 0 -b 100, --hint_layer 2).
    name: Literal["fitnet"] = "fitnet"
    ce_weight: NonNegativeFloat = 1.0
    hint_weight: NonNegativeFloat = 100.0
    hint_stage: PositiveInt = 2  # the teacher's stage whose output is the hint (1 = first stage)
    guided_stage: PositiveInt | None = None  # the student's stage regressed onto it; null: = hint_stage


class ConvRegressor(nn.Module):
    """The hint regressor of the reference code (RepDistiller / mdistiller `ConvReg`):
    conv -> batch norm -> ReLU from the student's (C_s, H_s, W_s) map to the teacher's
    (C_t, H_t, W_t). The conv depends on the sizes:

        H_s = 2 H_t            3x3, stride 2, padding 1
        2 H_s = H_t            4x4 transposed, stride 2, padding 1
        H_s >= H_t otherwise   valid conv of kernel (1 + H_s - H_t, 1 + W_s - W_t) (1x1 if equal)

    The reference decides on heights alone; here both sides must agree (square CIFAR maps
    behave identically), and any other pair of sizes is a ConfigError.
    """

    def __init__(self, student: StageInfo, teacher: StageInfo) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = (student.channels, student.height, student.width), (
            teacher.channels, teacher.height, teacher.width)
        if (hs, ws) == (2 * ht, 2 * wt):
            self.conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ConfigError(
                f"FitNet cannot regress a {cs}x{hs}x{ws} student map onto a {ct}x{ht}x{wt} teacher map: "
                "the regressor maps a student map of twice, half, the same or a larger size than the "
                "teacher's; choose method.guided_stage / method.hint_stage with compatible sizes"
            )
        self.bn = nn.BatchNorm2d(ct)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def stage_shape(model: nn.Module, role: str, stage: int, option: str, input_size: tuple[int, ...]) -> StageInfo:
    """Shape of `model`'s raw stage `stage` (1-based), from one dummy forward, or a ConfigError."""
    stages = feature_info(model, tuple(input_size)).raw_stages  # type: ignore[arg-type]
    if not 1 <= stage <= len(stages):
        shapes = ", ".join(f"{i + 1}: {s.channels}x{s.height}x{s.width}" for i, s in enumerate(stages))
        raise ConfigError(
            f"method.{option}={stage} is not a stage of the {role} ({type(model).__name__}), whose "
            f"stages are {shapes or 'none'}; choose one of 1..{len(stages)}"
        )
    return stages[stage - 1]


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


__all__ = ["ConvRegressor", "FitNet", "FitNetConfig", "stage_shape"]
