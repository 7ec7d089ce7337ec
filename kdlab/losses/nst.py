"""Neuron selectivity transfer (Huang, Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", arXiv 1707.01219, 2017).

Each channel's map over the H*W positions is one sample f^i (L2-normalised) of the distribution
of a layer's neuron selectivity patterns; the student's channels are matched to the teacher's by
the squared maximum mean discrepancy with the polynomial kernel k(x, y) = (x^T y + c)^d, d = 2,
c = 0 (the paper's Sec. 3, its NST loss; the equation numbers differ between the paper's
versions, so the formula is written out here):

    MMD^2 = 1/C_T^2 sum_{i,i'} k(f_T^i, f_T^i') + 1/C_S^2 sum_{j,j'} k(f_S^j, f_S^j')
            - 2/(C_T C_S) sum_{i,j} k(f_S^j, f_T^i)

per sample, averaged over the batch. The code behind the benchmarks' numbers (RepDistiller
`distiller_zoo/NST.py`, mdistiller `distillers/NST.py`) computes exactly this, with the teacher's
term a constant, after average-pooling the larger of the two maps to the smaller's size; its
weight (50) stands in for the paper's lambda/2. `nst_loss` is that code's value, computed with
batched matrix products instead of its (N, C, C, H*W) broadcast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.at import match_spatial_size
from kdlab.losses.kd import loss_dtype


def channel_patterns(feature: Tensor) -> Tensor:
    """The (N, C, H*W) neuron selectivity patterns of an (N, C, H, W) map: each channel's
    spatial map flattened and L2-normalised."""
    return F.normalize(feature.flatten(2), dim=2)


def mean_polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch and all channel pairs of (a_i^T b_j)^2, for (N, C_a, D) and (N, C_b, D)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """NST loss of one stage pair (Huang & Wang 2017, the squared MMD with the polynomial kernel
    d = 2, c = 0, as the reference code computes it): (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t)
    maps, channel counts free, the larger map first average-pooled to the smaller's size.

    The teacher is a constant (detached; its own term carries no gradient). Computed in float32
    with autocast off (float64 inputs stay float64).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: {student.shape[0]} and {teacher.shape[0]}")
    dtype = loss_dtype(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        s, t = match_spatial_size(student.to(dtype), teacher.detach().to(dtype))
        s, t = channel_patterns(s), channel_patterns(t)
        return mean_polynomial_kernel(t, t) + mean_polynomial_kernel(s, s) - 2 * mean_polynomial_kernel(s, t)


__all__ = ["channel_patterns", "mean_polynomial_kernel", "nst_loss"]
