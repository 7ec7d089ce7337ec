"""Probabilistic knowledge transfer (Passalis, Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018, arXiv 1803.10837).

Each network's batch of feature vectors defines conditional probabilities from the cosine
kernel K(a, b) = (cos(a, b) + 1) / 2: p_{j|i} = K(x_i, x_j) / sum_{k != i} K(x_i, x_k), and the
student minimises the Kullback-Leibler divergence sum_i sum_{j != i} p_{j|i} log(p_{j|i} / q_{j|i})
of its q_{j|i} from the teacher's p_{j|i} (the paper's Sec. 3, its loss with the cosine kernel;
the equation numbers differ between the paper's versions, so the formulas are written out here).
The code that produced the benchmarks' numbers (the authors' code, copied into RepDistiller
`distiller_zoo/PKT.py` and mdistiller `distillers/PKT.py`) differs in three details, all kept
here because the weight 30000 is calibrated for them: the sums include k = i and j = i, the
divergence is the *mean* of p log((p + eps) / (q + eps)) over all b^2 pairs rather than a sum,
and eps = 1e-7 is added to each norm and inside the log.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.kd import loss_dtype

#: The reference code's eps, added to each vector's norm and to both probabilities in the log.
PKT_EPS = 1e-7


def cosine_conditional_probabilities(features: Tensor, eps: float = PKT_EPS) -> Tensor:
    """Passalis & Tefas's p_{j|i} with the cosine kernel (module docstring) of (b, ...) features
    flattened per sample, as the reference computes them: rows divided by (norm + eps), NaNs
    set to 0, K = (x x^T + 1) / 2, each row divided by its sum (k = i included). Shape (b, b)."""
    x = features.flatten(1)
    # vector_norm instead of the reference's sqrt(sum(x^2)): the same values, and a zero
    # gradient rather than NaN for an all-zero vector.
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    kernel = (x @ x.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = PKT_EPS) -> Tensor:
    """PKT loss (Passalis & Tefas 2018, the KL divergence in the reference code's form): the
    mean over all b^2 pairs of p log((p + eps) / (q + eps)), p the teacher's and q the student's
    cosine conditional probabilities. The two feature sizes need not agree.

    The teacher is a constant (detached). Computed in float32 with autocast off (float64
    inputs stay float64).
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: {student.shape[0]} and {teacher.shape[0]}")
    dtype = loss_dtype(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        q = cosine_conditional_probabilities(student.to(dtype), eps)
        p = cosine_conditional_probabilities(teacher.detach().to(dtype), eps)
        return (p * torch.log((p + eps) / (q + eps))).mean()


__all__ = ["PKT_EPS", "cosine_conditional_probabilities", "pkt_loss"]
