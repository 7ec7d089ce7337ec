"""Attention transfer (Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv 1612.03928).

A stage's spatial attention map is the channel statistic F^p_sum(A) = sum_c |A_c|^p (paper
Sec. 3.1, p = 2), flattened and L2-normalised; the paper's Eq. (2) penalises

    beta/2 * sum_j || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p

over the chosen stage pairs j. The CIFAR-100 benchmarks kdlab reproduces (RepDistiller
`distiller_zoo/AT.py`, mdistiller `distillers/AT.py`) use the channel *mean* of A^p (no absolute
value: equal to the paper's for p = 2), the *squared* distance averaged over batch and positions,
and, when the two maps differ in size, first average-pool the larger one to the smaller's size;
their weight (1000) is calibrated for that form, which is what `at_loss` computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.kd import loss_dtype


def match_spatial_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """The two (N, C, H, W) maps at a common size: the taller one adaptive-average-pooled to
    the other's (H, W) (the references decide on heights alone and pool to a square of that
    height; for the square maps of CIFAR and ImageNet the two agree)."""
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"needs (N, C, H, W) maps, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[2] > teacher.shape[2]:
        student = F.adaptive_avg_pool2d(student, teacher.shape[2:])
    elif student.shape[2] < teacher.shape[2]:
        teacher = F.adaptive_avg_pool2d(teacher, student.shape[2:])
    return student, teacher


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis's spatial attention map of an (N, C, H, W) map: the channel mean
    of A^p, flattened to (N, H*W) and L2-normalised per sample (as the references write it)."""
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss of one stage pair (Zagoruyko & Komodakis 2017, Eq. 2, in the
    benchmarks' form): the mean over batch and positions of the squared difference of the two
    normalised attention maps, the larger map first pooled to the smaller's size.

    Channel counts may differ. The teacher is a constant (detached). Computed in float32 with
    autocast off (float64 inputs stay float64), so half-precision maps cannot overflow A^p.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: {student.shape[0]} and {teacher.shape[0]}")
    dtype = loss_dtype(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        s, t = match_spatial_size(student.to(dtype), teacher.detach().to(dtype))
        return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


__all__ = ["at_loss", "attention_map", "match_spatial_size"]
