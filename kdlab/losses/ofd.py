"""The feature loss of OFD (Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature
Distillation", ICCV 2019, arXiv 1904.01866), Section 3: the margin ReLU teacher transform and the
partial L2 distance, summed over stages as the authors' code and mdistiller (`distillers/OFD.py`) do.

Teacher transform: T = max(F_t, m), with F_t the teacher's feature *before* its ReLU and m, per
channel, the expectation of the negative responses, E[x | x < 0]. The paper takes x ~ N(mu, s^2)
from the batch norm that produces the pre-activation (mu its bias, s its |weight|):

    m = mu - s * phi(mu / s) / Phi(-mu / s)     if Phi(-mu / s) > 0.001
    m = -3 s                                     otherwise

Partial L2 (the distance function): element-wise (T_i - S_i)^2, except 0 where S_i <= T_i <= 0
(the student is already below a non-positive teacher response, which the ReLU would cut anyway).
Per stage the reference sums over channels and positions and averages over the batch; the stages
are weighted 1 / 2^(n - 1 - i), so the deepest counts 1, the one before 1/2, and so on.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Below this probability of a negative response the margin is -3 s (the reference's threshold).
NEGATIVE_MASS_FLOOR = 0.001


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    """Per-channel margin of OFD's margin ReLU: E[x | x < 0] for x ~ N(bias, |weight|^2), or -3|weight|
    where a negative response has probability 0.001 or less (Heo et al. 2019, Sec. 3, the teacher
    transform). Computed in float64; a channel with weight 0 gets its limit (bias if negative, else 0)
    where the reference divides by zero. Never positive."""
    s = bn_weight.detach().double().abs()
    mu = bn_bias.detach().double()
    z = -mu / s
    negative_mass = torch.special.ndtr(z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    conditional_mean = mu - s * density / negative_mass
    return torch.where(negative_mass > NEGATIVE_MASS_FLOOR, conditional_mean, -3 * s)


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """OFD's distance for one stage (Heo et al. 2019, Sec. 3): sum over channels and positions of
    (T - S)^2 with T = max(teacher, margin), skipping the elements where S <= T <= 0, averaged
    over the batch. `student` (connector output) and `teacher` (pre-ReLU) are (N, C, H, W) of the
    same shape; `margin` broadcasts against them ((C,) or (1, C, 1, 1)).

    The teacher and the margin are constants. Computed in float32 (float64 inputs stay float64).
    For a non-positive margin (every margin `ofd_margin` gives) this equals mdistiller's
    three-term `feat_loss`.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            "OFD's partial L2 needs the connector output and the teacher's map in the same shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.to(dtype)
    m = margin.detach().to(dtype)
    if m.dim() == 1:
        m = m.view(1, -1, 1, 1)
    t = torch.maximum(teacher.detach().to(dtype), m)
    kept = (s > t) | (t > 0)
    return ((s - t).square() * kept).sum() / s.shape[0]


def ofd_loss(students: Sequence[Tensor], teachers: Sequence[Tensor], margins: Sequence[Tensor]) -> Tensor:
    """OFD's feature loss over n stages, shallow to deep: sum_i partial_l2(S_i, pool(T_i), m_i) / 2^(n-1-i).

    `students` are the connector outputs, `teachers` the teacher's pre-ReLU stage maps, average-pooled
    to the student's spatial size when they differ (as mdistiller does; the authors' pairs have equal
    sizes), `margins` the per-channel margins of those teacher stages.
    """
    if not (len(students) == len(teachers) == len(margins)) or not students:
        raise ValueError(
            f"OFD needs as many student maps, teacher maps and margins, at least one; got "
            f"{len(students)}, {len(teachers)} and {len(margins)}"
        )
    n = len(students)
    total = students[0].new_zeros((), dtype=torch.promote_types(students[0].dtype, torch.float32))
    for i, (s, t, m) in enumerate(zip(students, teachers, margins)):
        if t.shape[-2:] != s.shape[-2:]:
            t = F.adaptive_avg_pool2d(t.detach(), s.shape[-2:])
        total = total + partial_l2(s, t, m) / 2 ** (n - 1 - i)
    return total


__all__ = ["NEGATIVE_MASS_FLOOR", "ofd_loss", "ofd_margin", "partial_l2"]
