"""AB: the student and per-stage connectors first learn the teacher's activation boundaries, then
the student trains on the labels (Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

As in the CRD benchmark (RepDistiller `--distill abound`, PAPERS.md section 6), in two phases
owned by the method (`kdlab.methods.phases`):

- init phase, epochs 1..init_epochs (30): the student and the connectors learn the AB loss
  alone (`kdlab.losses.ab_loss`, unweighted: RepDistiller's `helper/pretrain.py` sums the stage
  terms) between the connected student pre-activations and the teacher's, at every stage
  (RepDistiller's `feat[1:-1]` with `preact=True`: `Features.preact_stages`);
- main phase: cross-entropy alone (RepDistiller's main loop sets the AB term to 0 and keeps
  the connectors in eval mode, out of the optimizer; its script's KD weight `-a` is 0 and its
  `-b 1` multiplies nothing). The connectors get no gradient, so they stay as trained.

A connector is the identity where the two stages have the same channels and size, else the
reference's `ConvReg` without its ReLU (conv and batch norm, `kdlab.methods.connectors.ConvRegressor`
rules). The two networks need the same number of stages; any other pair is a ConfigError.
"""
from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, PositiveFloat
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.ab import ab_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, StepOutput
from kdlab.methods.connectors import ConvRegressor
from kdlab.methods.phases import InitPhaseConfig, PhasedDistiller
from kdlab.methods.stages import model_name, probe_pair
from kdlab.models import StageInfo


class ABConfig(InitPhaseConfig):
    # RepDistiller: -r 1 (CE in the main phase); the init phase's AB sum is unweighted, margin 1.
    name: Literal["ab"] = "ab"
    ce_weight: NonNegativeFloat = 1.0
    ab_weight: NonNegativeFloat = 1.0
    margin: PositiveFloat = 1.0


def ab_connector(student: StageInfo, teacher: StageInfo, stage: int) -> nn.Module:
    """RepDistiller's `Connector` for one stage: the identity for equal channels and height,
    else `ConvReg(use_relu=False)`, a conv (sized by the FitNet regressor's rules) and batch norm."""
    if (student.channels, student.height) == (teacher.channels, teacher.height):
        return nn.Identity()
    try:
        connector = ConvRegressor(student, teacher)
    except ConfigError:
        raise ConfigError(
            f"AB cannot connect stage {stage}: the student's {student.channels}x{student.height}x{student.width} "
            f"map to the teacher's {teacher.channels}x{teacher.height}x{teacher.width}; the connector maps a "
            "student map of twice, half, the same or a larger size than the teacher's"
        ) from None
    connector.relu = nn.Identity()  # a pre-activation is matched: no ReLU (the reference's use_relu=False)
    return connector


@register_method("ab")
class AB(PhasedDistiller):
    """Activation-boundary init phase (student + connectors), then cross-entropy training."""

    Config = ABConfig
    needs_teacher_features = True
    loss_names = ("ce", "ab")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        s_info, t_info = probe_pair("ab", student, teacher, self.input_size)
        s, t = s_info.preact_stages, t_info.preact_stages
        if len(s) != len(t):
            raise ConfigError(
                f"AB cannot serve {model_name(teacher)} -> {model_name(student)}: it connects every stage, "
                f"but the student has {len(s)} stages and the teacher {len(t)}; use a pair with equal stage counts"
            )
        self.connectors = nn.ModuleList(ab_connector(a, b, i + 1) for i, (a, b) in enumerate(zip(s, t)))

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: ABConfig = self.cfg  # type: ignore[assignment]
        if self.in_init_phase(epoch):
            _, t = self.teacher_forward(batch.images, features=True)
            logits, s = self.student(batch.images, features=True)
            connected = [c(f) for c, f in zip(self.connectors, s.preact_stages)]
            active = {"ab": cfg.ab_weight * ab_loss(connected, t.preact_stages, cfg.margin)}
        else:
            logits = self.student(batch.images)
            active = {"ce": cfg.ce_weight * cross_entropy(logits, batch.targets)}
        return self.output(logits, active, epoch)


__all__ = ["AB", "ABConfig", "ab_connector"]
