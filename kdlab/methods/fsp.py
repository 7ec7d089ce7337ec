"""FSP: the student first learns the teacher's flow of solution procedure (FSP matrices between
consecutive feature maps), then trains on the labels (Yim, Joo, Bae, Kim, "A Gift from
Knowledge Distillation", CVPR 2017).

As in the CRD benchmark (RepDistiller `--distill fsp`, PAPERS.md section 6), in two phases
owned by the method (`kdlab.methods.phases`):

- init phase, epochs 1..init_epochs (30): the student's feature layers learn the FSP loss
  alone (`kdlab.losses.fsp_loss`, unweighted: RepDistiller's `helper/pretrain.py` sums the
  pair terms), on the stem and every stage of both networks (RepDistiller's `feat[:-1]`:
  `Features.stem` and `Features.raw_stages`);
- main phase: cross-entropy alone (RepDistiller's main loop sets the FSP term to 0, and its
  script's KD weight `-a` is 0; its `-b 50` therefore multiplies nothing).

The FSP matrices of the two networks must have the same shapes, so the two networks need the
same number of stages and the same channel counts at the stem and at every stage: the
same-family pairs of the CRD table, except WRN-40-2 -> WRN-40-1 (n/a there); any other pair is
a ConfigError at construction.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeFloat
from torch import nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.fsp import fsp_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, StepOutput
from kdlab.methods.phases import InitPhaseConfig, PhasedDistiller
from kdlab.methods.stages import model_name
from kdlab.models import feature_info


class FSPConfig(InitPhaseConfig):
    # RepDistiller: -r 1 (CE in the main phase); the init phase's FSP sum is unweighted.
    name: Literal["fsp"] = "fsp"
    ce_weight: NonNegativeFloat = 1.0
    fsp_weight: NonNegativeFloat = 1.0


@torch.no_grad()
def fsp_channels(model: nn.Module, input_size: tuple[int, int, int]) -> list[int] | None:
    """Channel counts of `model`'s stem and raw stages (the maps FSP joins), or None when the
    model reports no stem. Stage shapes come from `feature_info` (which also refuses models
    without spatial stages); the stem's from one more dummy forward in eval mode."""
    stages = feature_info(model, input_size).raw_stages
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        _, feats = model(torch.zeros(2, *input_size, device=param.device), features=True)
    finally:
        model.train(was_training)
    if feats.stem is None:
        return None
    return [int(feats.stem.shape[1]), *(s.channels for s in stages)]


def check_fsp_pair(student: nn.Module, teacher: nn.Module, input_size: tuple[int, int, int]) -> None:
    """ConfigError unless the two networks' stem + stage channel counts are equal."""
    pair = f"{model_name(teacher)} -> {model_name(student)}"
    s, t = fsp_channels(student, input_size), fsp_channels(teacher, input_size)
    if s is None or t is None:
        raise ConfigError(f"FSP cannot serve {pair}: the {'student' if s is None else 'teacher'} reports no "
                          "stem feature (Features.stem), and FSP joins the stem to the first stage")
    if s != t:
        raise ConfigError(
            f"FSP cannot serve {pair}: its FSP matrices join the stem and every stage, so both networks need "
            f"the same channel counts there, but the student has {s} and the teacher {t}; use a pair of the "
            "same family and width (the CRD benchmark reports FSP for such pairs only)"
        )


@register_method("fsp")
class FSP(PhasedDistiller):
    """FSP init phase on the student's feature layers, then cross-entropy training."""

    Config = FSPConfig
    needs_teacher_features = True
    loss_names = ("ce", "fsp")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        check_fsp_pair(student, teacher, self.input_size)  # type: ignore[arg-type]

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: FSPConfig = self.cfg  # type: ignore[assignment]
        if self.in_init_phase(epoch):
            _, t = self.teacher_forward(batch.images, features=True)
            logits, s = self.student(batch.images, features=True)
            active = {"fsp": cfg.fsp_weight * fsp_loss([s.stem, *s.raw_stages], [t.stem, *t.raw_stages])}
        else:
            logits = self.student(batch.images)
            active = {"ce": cfg.ce_weight * cross_entropy(logits, batch.targets)}
        return self.output(logits, active, epoch)


__all__ = ["FSP", "FSPConfig", "check_fsp_pair", "fsp_channels"]
