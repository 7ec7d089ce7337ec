"""VID: ce_weight * CE + vid_weight * sum over stages of -log q(t | s), q a Gaussian with a
regressed mean and a learned per-channel variance (Ahn, Hu, Damianou, Lawrence, Dai, "Variational
Information Distillation for Knowledge Transfer", CVPR 2019).

As in the CRD benchmark (RepDistiller `--distill vid -r 1 -a 0 -b 1`; PAPERS.md section 6): one
term per stage, stage i of the student with stage i of the teacher for every stage both networks
have (RepDistiller zips `feat[1:-1]`, the stage outputs without the stem and the pooled vector:
kdlab's `Features.raw_stages`; a deeper network's extra final stages are left out); the larger map
of a pair is average-pooled to the smaller; per pair a regressor conv1x1(C_s, C_t) - ReLU -
conv1x1(C_t, C_t) - ReLU - conv1x1(C_t, C_t), no bias (RepDistiller `VIDLoss(s, t, t)`), and a
per-channel alpha with sigma^2 = softplus(alpha) + 1e-5, initialised to sigma^2 = 5, trained with
the student (RepDistiller puts the whole `VIDLoss` in its optimizer, weight decay included).

mdistiller's VID differs in one point: its alphas are a plain Python list, neither registered nor
given to the optimizer, so its variance stays at 5 all run; `learn_variance: false` reproduces that
(the alphas become a buffer). The published numbers are RepDistiller's, so the default learns it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.losses.vid import VID_EPS, VID_INIT_VARIANCE, initial_log_scale, match_spatial, vid_nll, vid_variance
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.methods.stages import model_name, probe_pair


class VIDConfig(MethodConfig):
    # Defaults: PAPERS.md section 6 (RepDistiller -r 1 -a 0 -b 1, VIDLoss(init_pred_var=5.0, eps=1e-5));
    # mdistiller VID: CE_WEIGHT 1, FEAT_WEIGHT 1, INIT_PRED_VAR 5.0, EPS 1e-5.
    name: Literal["vid"] = "vid"
    ce_weight: NonNegativeFloat = 1.0
    vid_weight: NonNegativeFloat = 1.0  # on the sum over stages of each stage's mean NLL
    init_variance: PositiveFloat = VID_INIT_VARIANCE
    eps: PositiveFloat = VID_EPS
    learn_variance: bool = True  # false: mdistiller's fixed variance (its alphas are never trained)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


class VIDHead(nn.Module):
    """One stage pair's part of q(t | s): the mean regressor and the per-channel alpha."""

    def __init__(self, student_channels: int, teacher_channels: int, init_log_scale: float, learn: bool) -> None:
        super().__init__()
        c = teacher_channels
        self.regressor = nn.Sequential(conv1x1(student_channels, c), nn.ReLU(), conv1x1(c, c), nn.ReLU(),
                                       conv1x1(c, c))
        log_scale = torch.full((c,), init_log_scale)
        if learn:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, student: Tensor, teacher: Tensor, eps: float) -> Tensor:
        student, teacher = match_spatial(student, teacher)
        return vid_nll(self.regressor(student), teacher, self.log_scale, eps)


@register_method("vid")
class VID(Distiller):
    """Variational information distillation on every stage the two networks share."""

    Config = VIDConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: VIDConfig = cfg  # type: ignore[assignment]
        s_info, t_info = probe_pair("vid", student, teacher, self.input_size)
        if not (s_info.raw_stages and t_info.raw_stages):
            raise ConfigError(
                f"method vid cannot distil {model_name(teacher)} -> {model_name(student)}: VID "
                "matches stage feature maps and one of the two reports none; use convolutional models"
            )
        alpha = initial_log_scale(c.init_variance, c.eps)
        self.heads = nn.ModuleList(
            VIDHead(s.channels, t.channels, alpha, c.learn_variance)
            for s, t in zip(s_info.raw_stages, t_info.raw_stages)
        )

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: VIDConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        nll = sum(head(s, t, cfg.eps) for head, s, t in zip(self.heads, s_feats.raw_stages, t_feats.raw_stages))
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "vid": cfg.vid_weight * nll,
        }
        stats = {
            "vid_nll": nll.detach(),  # unweighted
            # The learned variances, averaged over every channel of every stage: they shrink as
            # the regressors learn to predict the teacher.
            "vid_variance": torch.cat([vid_variance(h.log_scale.detach(), cfg.eps) for h in self.heads]).mean(),
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["VID", "VIDConfig", "VIDHead"]
