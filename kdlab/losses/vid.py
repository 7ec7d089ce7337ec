"""Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019, arXiv 1904.05835).

VID maximises a variational lower bound of the mutual information between a teacher feature t and
a student feature s by fitting q(t | s), a Gaussian whose mean mu(s) is regressed from the student's
map and whose variance sigma_c^2 is learned per channel (Sec. 3; equation numbers of arXiv v1):

    -log q(t | s) = sum_(c,h,w) [ log sigma_c + (t_chw - mu_chw(s))^2 / (2 sigma_c^2) ] + const   (Eq. 4)
    sigma_c^2 = log(1 + exp(alpha_c)) + eps                                                      (Eq. 5)

As in the authors' code (ssahn0215/variational-information-distillation), copied by RepDistiller
(`distiller_zoo/VID.py`) and mdistiller (`distillers/VID.py`), `vid_nll` is the element mean of
0.5 * ((mu - t)^2 / sigma^2 + log sigma^2) (the constant dropped, a mean instead of the sum), with
eps = 1e-5 and alpha initialised so that sigma^2 = 5 (`initial_log_scale`). Before regression the
larger of the two maps is average-pooled to the smaller one's size (`match_spatial`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The variance floor and the initial variance of the authors' code (mdistiller VID.EPS, INIT_PRED_VAR).
VID_EPS = 1e-5
VID_INIT_VARIANCE = 5.0


def initial_log_scale(init_variance: float = VID_INIT_VARIANCE, eps: float = VID_EPS) -> float:
    """alpha with softplus(alpha) + eps = init_variance: log(exp(init_variance - eps) - 1)."""
    if init_variance <= eps:
        raise ValueError(f"the initial variance must exceed eps={eps}, got {init_variance}")
    return math.log(math.expm1(init_variance - eps))


def vid_variance(log_scale: Tensor, eps: float = VID_EPS) -> Tensor:
    """sigma^2 = log(1 + exp(alpha)) + eps per channel (exact and overflow-free as logaddexp)."""
    return torch.logaddexp(log_scale, torch.zeros_like(log_scale)) + eps


def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The two (N, C, H, W) maps at one size: the larger is adaptive-average-pooled to the
    smaller's height and width (the reference compares heights and pools to a square, the same
    for square maps)."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def vid_nll(pred_mean: Tensor, teacher: Tensor, log_scale: Tensor, eps: float = VID_EPS) -> Tensor:
    """The VID loss of one stage (Ahn et al. 2019, Eqs. 4 and 5, as the authors' code averages it): the
    element mean of 0.5 * ((mu - t)^2 / sigma_c^2 + log sigma_c^2), for the regressed mean mu and
    the teacher map t, both (N, C, H, W), and the per-channel alpha (C,) of sigma^2.

    The teacher map is a constant; mu and alpha get gradients. Computed in float32 (float64
    inputs stay float64), so half-precision maps give a finite loss.
    """
    if pred_mean.shape != teacher.shape or log_scale.shape != pred_mean.shape[1:2]:
        raise ValueError(
            "vid_nll needs the regressed mean and the teacher map in one (N, C, H, W) shape and one "
            f"log-scale per channel, got {tuple(pred_mean.shape)}, {tuple(teacher.shape)} and "
            f"{tuple(log_scale.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(pred_mean.dtype, log_scale.dtype), torch.float32)
    variance = vid_variance(log_scale.to(dtype), eps).view(1, -1, 1, 1)
    error = pred_mean.to(dtype) - teacher.detach().to(dtype)
    return (0.5 * (error.pow(2) / variance + variance.log())).mean()


__all__ = ["VID_EPS", "VID_INIT_VARIANCE", "initial_log_scale", "match_spatial", "vid_nll", "vid_variance"]
