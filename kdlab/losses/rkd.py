"""Relational knowledge distillation (Park, Kim, Lu, Cho, "Relational Knowledge Distillation",
CVPR 2019, arXiv 1904.05068): the distance-wise and angle-wise losses on a batch of embeddings.

For embeddings t_1..t_N of the teacher and s_1..s_N of the student (flattened to vectors),

    psi_D(t_i, t_j) = ||t_i - t_j|| / mu,   mu = mean of ||t_i - t_j|| over the pairs i != j   (Eq. 4)
    L_RKD-D = sum_(i,j) l_delta(psi_D(t_i, t_j), psi_D(s_i, s_j))                             (Eq. 5)
    psi_A(t_i, t_j, t_k) = <e_ij, e_kj>,    e_ij = (t_i - t_j) / ||t_i - t_j||                 (Eq. 6)
    L_RKD-A = sum_(i,j,k) l_delta(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k))                  (Eq. 7)

with l_delta the Huber loss (smooth L1, delta 1). As in the authors' code, which RepDistiller
(`distiller_zoo/RKD.py`) and mdistiller (`distillers/RKD.py`) copy, the sums are means (over
the N^2 pairs, diagonal included, and over the N^3 triplets, degenerate ones included), the
distances come from the Gram matrix with the squared distance clamped at `eps` before the
square root (so identical samples sit at sqrt(eps), not 0) and the diagonal set to 0, and
the teacher side is a constant. `rkd_loss` is 25 * L_D + 50 * L_A, the benchmarks' weights.

Numerics: the Gram-matrix distance cancels catastrophically in half precision, so everything
runs in float32 (float64 inputs stay float64) with autocast off. The mean distance divides by
the number of positive distances counted on the device (no data-dependent indexing, so no
host synchronisation); a batch of one sample has no pair and gives 0 (the reference: NaN).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: The clamp of the squared pairwise distance in the authors' code (mdistiller PDIST.EPSILON).
PDIST_EPS = 1e-12


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))


def pairwise_distances(e: Tensor, squared: bool = False, eps: float = PDIST_EPS) -> Tensor:
    """The (N, N) Euclidean distances between the rows of `e` (N, D) as the authors compute
    them: ||e_i||^2 + ||e_j||^2 - 2 <e_i, e_j>, clamped at `eps`, square-rooted unless
    `squared`, with a zero diagonal."""
    e_square = e.pow(2).sum(1)
    dist = (e_square[:, None] + e_square[None, :] - 2 * (e @ e.T)).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    return dist.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0.0)


def normalized_distances(e: Tensor, squared: bool = False, eps: float = PDIST_EPS) -> Tensor:
    """psi_D of Eq. 4: the pairwise distances divided by their mean over the positive ones
    (the pairs i != j)."""
    d = pairwise_distances(e, squared, eps)
    positive = (d > 0).sum().clamp(min=1)
    mean = (d.sum() / positive).clamp(min=torch.finfo(d.dtype).tiny)
    return d / mean


def triplet_angles(e: Tensor) -> Tensor:
    """psi_A of Eq. 6 for every triplet, flattened: entry (i, j, k) is the cosine of the angle
    at e_i between e_j and e_k, computed from unit difference vectors (a zero difference, as
    for j = i, has cosine 0)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKDTerms(NamedTuple):
    """The two unweighted losses: distance-wise (Eq. 5) and angle-wise (Eq. 7), as means."""

    distance: Tensor
    angle: Tensor


def rkd_terms(student: Tensor, teacher: Tensor, squared: bool = False, eps: float = PDIST_EPS) -> RKDTerms:
    """L_RKD-D and L_RKD-A (Park et al. 2019, Eqs. 5 and 7, as the authors' code averages them)
    of student and teacher embeddings (N, ...) of the same batch; their widths may differ."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"RKD relates the samples of one batch: student and teacher embeddings must have the "
            f"same batch size, got {student.shape[0]} and {teacher.shape[0]}"
        )
    with torch.autocast(student.device.type, enabled=False):
        s, t = _flat(student), _flat(teacher.detach())
        with torch.no_grad():
            t_d = normalized_distances(t, squared, eps)
            t_a = triplet_angles(t)
        distance = F.smooth_l1_loss(normalized_distances(s, squared, eps), t_d)
        angle = F.smooth_l1_loss(triplet_angles(s), t_a)
    return RKDTerms(distance, angle)


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             squared: bool = False, eps: float = PDIST_EPS) -> Tensor:
    """The RKD loss of the authors' code (Park et al. 2019, Eq. 3 with Eqs. 5 and 7):
    distance_weight * L_RKD-D + angle_weight * L_RKD-A, by default the benchmarks' 25 and 50."""
    terms = rkd_terms(student, teacher, squared, eps)
    return distance_weight * terms.distance + angle_weight * terms.angle


__all__ = ["PDIST_EPS", "RKDTerms", "normalized_distances", "pairwise_distances", "rkd_loss", "rkd_terms",
           "triplet_angles"]
