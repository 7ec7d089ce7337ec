"""OFD: ce_weight * CE + feat_weight * sum_i partial_L2(connector_i(S_i), max(T_i, m_i)) / 2^(n-1-i)
(Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).

As in mdistiller's `distillers/OFD.py` (the DKD authors' code, which follows the OFD authors'
clovaai/overhaul-distillation):

- the tensors are both networks' stage outputs *before* their final ReLU (`Features.preact_stages`;
  mdistiller `preact_feats[1:]`: the stem excluded, as kdlab's stages always are), the deepest
  min(n_student, n_teacher) of each unless `student_stages` / `teacher_stages` choose;
- the margin m_i of each teacher stage comes from the affine parameters of the batch norm before
  that ReLU (`kdlab.models.preact_bn.bn_before_relu`), once, at construction;
- each student stage passes a connector, conv k x k (k = 1, no bias) + batch norm, to the teacher
  stage's channels, initialised as the reference does; the teacher map is average-pooled to the
  student's size where they differ;
- the stage terms are weighted 1 / 2^(n-1-i) (deepest 1) and each is summed over channels and
  positions and averaged over the batch; CE weight 1, feature weight 0.001 on CIFAR (1e-4 on
  ImageNet), no warm-up;
- the teacher normalises with the *batch's* statistics (`teacher_bn: batch`): both reference codes
  run the teacher in training mode during distillation (overhaul-distillation calls
  `t_net.train()`, and mdistiller's OFD overrides `train()` without putting the teacher back in
  eval mode). kdlab does this inside the step only, without updating the teacher's running
  statistics, and the teacher stays in eval mode otherwise; `teacher_bn: running` uses them.

Where mdistiller would pair the margins of the teacher's first stages with its last features (a
teacher with more stages than the student), kdlab takes the margins of the stages it distils.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

from pydantic import NonNegativeFloat, PositiveInt
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.ofd import ofd_loss, ofd_margin
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import model_name, paired_stages, probe_pair
from kdlab.models.preact_bn import bn_before_relu


class OFDConfig(MethodConfig):
    # Defaults: mdistiller CFG.OFD (LOSS.CE_WEIGHT 1.0, LOSS.FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1);
    # its ImageNet config sets FEAT_WEIGHT 0.0001.
    name: Literal["ofd"] = "ofd"
    ce_weight: NonNegativeFloat = 1.0
    feat_weight: NonNegativeFloat = 0.001
    connector_kernel: PositiveInt = 1  # odd: the connector keeps the student's spatial size
    student_stages: list[PositiveInt] | None = None  # 1-based; null: the deepest both networks share
    teacher_stages: list[PositiveInt] | None = None  # paired in order with student_stages
    teacher_bn: Literal["batch", "running"] = "batch"  # the statistics the teacher normalises with


def connector(student_channels: int, teacher_channels: int, kernel: int) -> nn.Sequential:
    """The reference's `ConnectorConvBN` entry: conv (no bias) + batch norm, the conv drawn from
    N(0, 2 / (k^2 * C_out)) and the batch norm at weight 1, bias 0."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel, stride=1, padding=(kernel - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * teacher_channels)))
    bn = nn.BatchNorm2d(teacher_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@contextmanager
def batch_statistics(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block the batch norms normalise with the batch's own mean and variance and leave
    their running statistics as they are (what a module in training mode that tracks no running
    statistics does); their modes are restored afterwards."""
    saved = [(bn.training, bn.track_running_stats) for bn in norms]
    for bn in norms:
        bn.training, bn.track_running_stats = True, False
    try:
        yield
    finally:
        for bn, (training, tracking) in zip(norms, saved):
            bn.training, bn.track_running_stats = training, tracking


@register_method("ofd")
class OFD(Distiller):
    """Overhaul of feature distillation: connectors map the student's pre-ReLU stages onto the
    teacher's margin-ReLU-transformed ones under the partial L2 distance."""

    Config = OFDConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: OFDConfig = cfg  # type: ignore[assignment]
        pair = f"student {model_name(student)}, teacher {model_name(teacher)}"
        if c.connector_kernel % 2 == 0:
            raise ConfigError(f"OFD: method.connector_kernel={c.connector_kernel} must be odd, so that the "
                              "connector keeps the student's spatial size (the reference uses 1)")
        try:
            norms = bn_before_relu(teacher)
        except ConfigError as exc:
            raise ConfigError(f"OFD cannot distil from this teacher ({pair}): its margins come from the batch "
                              f"norm before each teacher stage's ReLU, and {exc}") from None
        s_feats, t_feats = probe_pair("ofd", student, teacher, self.input_size)
        s_info, t_info = s_feats.preact_stages, t_feats.preact_stages
        self.student_indices, self.teacher_indices = paired_stages(
            "OFD", student, teacher, s_info, t_info, c.student_stages, c.teacher_stages, unchosen="deepest")
        self.connectors = nn.ModuleList(
            connector(s_info[i].channels, t_info[j].channels, c.connector_kernel)
            for i, j in zip(self.student_indices, self.teacher_indices))
        for k, j in enumerate(self.teacher_indices):
            margin = ofd_margin(norms[j].weight, norms[j].bias).float().view(1, -1, 1, 1)
            self.register_buffer(f"margin{k}", margin, persistent=False)  # rebuilt from the teacher
        # The teacher's batch norms, kept outside the module tree (they are registered under `teacher.`).
        self._teacher_norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @property
    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{k}") for k in range(len(self.connectors))]

    def teacher_preacts(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits and distilled pre-ReLU stages, normalised as `teacher_bn` says."""
        cfg: OFDConfig = self.cfg  # type: ignore[assignment]
        with batch_statistics(self._teacher_norms if cfg.teacher_bn == "batch" else []):
            logits, feats = self.teacher_forward(images, features=True)
        return logits, [feats.preact_stages[j] for j in self.teacher_indices]

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: OFDConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_maps = self.teacher_preacts(batch.images)
        logits, s_feats = self.student(batch.images, features=True)
        s_maps = [conn(s_feats.preact_stages[i]) for conn, i in zip(self.connectors, self.student_indices)]
        feat = ofd_loss(s_maps, t_maps, self.margins)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "ofd": cfg.feat_weight * feat,
        }
        stats = {
            "ofd_distance": feat.detach(),  # unweighted, to compare across feature weights
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["OFD", "OFDConfig", "batch_statistics", "connector"]
