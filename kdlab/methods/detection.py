"""Distillation of torchvision detectors (`task: detection`), as in the ReviewKD and DKD
authors' Detectron2 code (mdistiller/detection/model/rcnn.py and reviewkd.py).

Every method's loss is the student detector's own training losses (torchvision's, named
without their `loss_` prefix: `classifier`, `box_reg`, `objectness`, `rpn_box_reg`, `mask`;
RetinaNet: `classification`, `bbox_regression`) plus its distillation terms:

    det_vanilla        nothing more (teachers and the student-alone baseline)
    det_kd             kd:   weight * T^2 KL(teacher || student) on the ROI box classifier
    det_dkd            tckd, nckd: alpha * TCKD + beta * NCKD on the same ROI logits
    det_reviewkd       reviewkd: weight * sum_l HCL(ABF-fused student P_l, teacher P_l)
    det_reviewkd_dkd   reviewkd + tckd + nckd

ROI logits: the student's (C + 1)-way box-classifier logits for its sampled training
proposals, and the teacher's ROI box head run on exactly those proposals, pooled from the
teacher's own FPN features of the same input; the targets are the proposals' matched
classes, background (0) included. RetinaNet has no ROI box classifier (its head scores
anchors densely), so only `det_reviewkd` applies to it.

ReviewKD: the five 256-channel FPN outputs of each detector (P2-P6; P3-P7 for RetinaNet),
fused deepest first by attention-based fusion modules (kdlab.methods.reviewkd.ABF, middle
width 256) and compared level by level with the hierarchical context loss
(kdlab.losses.hcl). As in the authors' detection code, no distillation term is warmed up
(only the learning rate is, by the schedule).

The methods are named `det_*` because a method name selects one config class, and the
detection settings differ (DKD: alpha 1, beta 0.25, T 1, no cross-entropy weight: the
detector's own losses are the task loss).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar, Literal

import torch
from pydantic import NonNegativeFloat, PositiveInt
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.errors import ConfigError
from kdlab.losses import dkd_terms, hcl_level_losses, kd_loss
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.methods.reviewkd import ABF
from kdlab.models.detection import (
    DetectorPass, fpn_shapes, num_object_classes, roi_class_logits, spec_of, train_forward,
)


class DetVanillaConfig(MethodConfig):
    name: Literal["det_vanilla"] = "det_vanilla"


class DetKDConfig(MethodConfig):
    # The authors' detection code has no KD setting; KD here uses DKD's temperature (1), weight 1.
    name: Literal["det_kd"] = "det_kd"
    temperature: Temperature = 1.0
    weight: NonNegativeFloat = 1.0


class DetDKDConfig(MethodConfig):
    # The authors' detection defaults (mdistiller detection/model/config.py).
    name: Literal["det_dkd"] = "det_dkd"
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 0.25
    temperature: Temperature = 1.0


class DetReviewKDConfig(MethodConfig):
    # weight: the per-pair LOSS_WEIGHT of the authors' configs (configs/coco/ set them).
    name: Literal["det_reviewkd"] = "det_reviewkd"
    weight: NonNegativeFloat = 1.0
    mid_channels: PositiveInt = 256


class DetReviewKDDKDConfig(DetReviewKDConfig):
    name: Literal["det_reviewkd_dkd"] = "det_reviewkd_dkd"  # type: ignore[assignment]
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 0.25
    temperature: Temperature = 1.0


class DetectionDistiller(Distiller):
    """Base of the detection methods: the student's own losses, the checks that teacher and
    student fit together, and the hooks `roi_losses` / `fpn_losses` that methods fill."""

    tasks = frozenset({"detection"})
    needs_teacher_features = True
    uses_roi_logits: ClassVar[bool] = False
    uses_fpn: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 800, 800), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        spec_of(student)  # a kdlab detector, or a clear error
        if teacher is not None:
            check_pair(student, teacher, cfg.name, roi=self.uses_roi_logits, fpn=self.uses_fpn)

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        out = train_forward(self.student, batch.images, batch.targets)
        losses = {k.removeprefix("loss_"): v for k, v in out.losses.items()}
        stats: dict[str, Tensor] = {}
        if self.teacher is not None:
            with torch.no_grad():  # the teacher sees the very tensor the student saw
                t_features = self.teacher.backbone(out.inputs)
            if self.uses_roi_logits:
                with torch.no_grad():
                    t_logits = roi_class_logits(self.teacher, t_features, out.proposals, out.image_sizes)
                self.roi_losses(out.class_logits, t_logits, out.proposal_labels, losses, stats)
            if self.uses_fpn:
                self.fpn_losses(out, t_features, losses, stats)
        return StepOutput(None, losses, stats)

    def roi_losses(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                   losses: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
        """Add the ROI-logit distillation terms (methods with `uses_roi_logits`)."""

    def fpn_losses(self, out: DetectorPass, teacher_features: "OrderedDict[str, Tensor]",
                   losses: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
        """Add the FPN-feature distillation terms (methods with `uses_fpn`)."""


def check_pair(student: nn.Module, teacher: nn.Module, method: str, *, roi: bool, fpn: bool) -> None:
    """ConfigErrors for a teacher that cannot distil into this student with `method`."""
    s_spec, t_spec = spec_of(student), spec_of(teacher)
    s_classes, t_classes = num_object_classes(student), num_object_classes(teacher)
    if s_classes != t_classes:
        raise ConfigError(
            f"the teacher ({t_spec.name}) predicts {t_classes} object classes but the student ({s_spec.name}) "
            f"{s_classes}: they must be trained on the same categories; use a teacher trained on this dataset "
            "with the same detection.labels setting"
        )
    for key in ("image_mean", "image_std"):
        if list(getattr(student.transform, key)) != list(getattr(teacher.transform, key)):
            raise ConfigError(
                f"teacher and student normalise images differently ({key} {list(getattr(teacher.transform, key))} vs "
                f"{list(getattr(student.transform, key))}); the teacher reads the student's input tensor, so set the "
                "same model.kwargs.image_mean/image_std on both"
            )
    if roi and not (s_spec.two_stage and t_spec.two_stage):
        raise ConfigError(
            f"method {method!r} distils the ROI box classifier, which RetinaNet does not have (its head scores "
            "anchors densely); use det_reviewkd with RetinaNet, or Faster/Mask R-CNN for both models"
        )
    if fpn:
        s_shapes, t_shapes = fpn_shapes(student), fpn_shapes(teacher)
        if s_shapes != t_shapes:
            raise ConfigError(
                f"method {method!r} compares FPN outputs level by level, but the student's ({s_spec.name}: "
                f"{s_shapes}) and the teacher's ({t_spec.name}: {t_shapes}) differ; pair detectors of the same "
                "family (RetinaNet with RetinaNet, R-CNNs with R-CNNs)"
            )


def roi_stats(teacher_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Diagnostics: the teacher's mean probability of the proposals' matched classes, and the
    fraction of foreground proposals."""
    p = teacher_logits.float().softmax(1).gather(1, labels[:, None]).mean()
    return {"teacher_roi_conf": p.detach(), "roi_fg_fraction": (labels > 0).float().mean().detach()}


@register_method("det_vanilla")
class DetVanilla(DetectionDistiller):
    """The detector's own losses only: teachers and the student-alone baseline."""

    Config = DetVanillaConfig
    requires_teacher = False
    needs_teacher_features = False


@register_method("det_kd")
class DetKD(DetectionDistiller):
    """KD (Hinton et al. 2015) on the ROI box classifier's (C + 1)-way logits."""

    Config = DetKDConfig
    uses_roi_logits = True

    def roi_losses(self, logits, teacher_logits, labels, losses, stats) -> None:
        cfg: DetKDConfig = self.cfg  # type: ignore[assignment]
        losses["kd"] = cfg.weight * kd_loss(logits, teacher_logits, cfg.temperature)
        stats.update(roi_stats(teacher_logits, labels))


class _DKDOnROIs:
    """DKD's two terms on the ROI logits (shared by det_dkd and det_reviewkd_dkd)."""

    def roi_losses(self, logits, teacher_logits, labels, losses, stats) -> None:
        cfg = self.cfg  # type: ignore[attr-defined]
        parts = dkd_terms(logits, teacher_logits, labels, cfg.temperature)
        losses["tckd"] = cfg.alpha * parts.tckd.mean()
        losses["nckd"] = cfg.beta * parts.nckd.mean()
        stats.update(roi_stats(teacher_logits, labels))
        stats["tckd"], stats["nckd"] = parts.tckd.detach().mean(), parts.nckd.detach().mean()


@register_method("det_dkd")
class DetDKD(_DKDOnROIs, DetectionDistiller):
    """DKD (Zhao et al. 2022) on the ROI box classifier: alpha * TCKD + beta * NCKD."""

    Config = DetDKDConfig
    uses_roi_logits = True


@register_method("det_reviewkd")
class DetReviewKD(DetectionDistiller):
    """ReviewKD (Chen et al. 2021) on the FPN outputs."""

    Config = DetReviewKDConfig
    uses_fpn = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, **kwargs) -> None:
        super().__init__(student, teacher, cfg, **kwargs)
        c: DetReviewKDConfig = cfg  # type: ignore[assignment]
        probe = 128
        shapes = fpn_shapes(student, probe)[::-1]  # deepest level first
        # Level names by stride (P2 = stride 4), for the per-level statistics.
        self.level_names = [f"p{round(math.log2(probe / w))}" for _, _, w in shapes]
        # The deepest level has nothing deeper to fuse with.
        self.abfs = nn.ModuleList(ABF(ch, c.mid_channels, ch, fuse=i > 0) for i, (ch, _, _) in enumerate(shapes))

    def fpn_losses(self, out, teacher_features, losses, stats) -> None:
        cfg: DetReviewKDConfig = self.cfg  # type: ignore[assignment]
        s_levels = list(out.features.values())[::-1]
        t_levels = list(teacher_features.values())[::-1]
        # Batch norm cannot normalise a level with a single value per channel (one image, a
        # 1x1 map): such a step uses the running statistics of the fusion modules.
        single = self.training and any(f.shape[0] * f.shape[2] * f.shape[3] == 1 for f in s_levels)
        if single:
            self.abfs.eval()
        try:
            fused, residual = [], None
            for abf, x, t in zip(self.abfs, s_levels, t_levels):
                y, residual = abf(x, residual, t.shape[-2:])
                fused.append(y)
        finally:
            if single:
                self.abfs.train()
        per_level = hcl_level_losses(fused, t_levels)
        losses["reviewkd"] = cfg.weight * torch.stack(per_level).sum()
        stats.update({f"hcl_{name}": v.detach() for name, v in zip(self.level_names, per_level)})


@register_method("det_reviewkd_dkd")
class DetReviewKDDKD(_DKDOnROIs, DetReviewKD):
    """ReviewKD on the FPN outputs plus DKD on the ROI logits ("ReviewDKD" in the authors' code)."""

    Config = DetReviewKDDKDConfig
    uses_roi_logits = True


__all__ = [
    "DetDKD", "DetDKDConfig", "DetKD", "DetKDConfig", "DetReviewKD", "DetReviewKDConfig", "DetReviewKDDKD",
    "DetReviewKDDKDConfig", "DetVanilla", "DetVanillaConfig", "DetectionDistiller", "check_pair", "roi_stats",
]
