"""The flow of solution procedure (FSP) of Yim, Joo, Bae, Kim, "A Gift from Knowledge
Distillation: Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017.

Eq. (1), the FSP matrix between two feature maps F1 (h, w, m) and F2 (h, w, n) of one network:

    G_ij(x) = sum_s sum_t F1_sti(x) * F2_stj(x) / (h * w)

Eq. (2), the loss between the teacher's and the student's matrices:

    L_FSP = 1/N sum_x sum_i lambda_i || G_i^T(x) - G_i^S(x) ||_2^2

As in the CRD benchmark (RepDistiller `distiller_zoo/FSP.py`), whose numbers kdlab reproduces:
the matrices join each pair of consecutive maps of a feature list (stem and stages), the larger
of the two maps is average-pooled to the smaller's size first, and each pair's term is the mean
over the batch and both channel axes of the squared difference (lambda_i = 1 / (m_i n_i)),
summed over the pairs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.kd import loss_dtype


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two maps at one size: the larger (by height, then width) average-pooled to the smaller's
    size, as RepDistiller's FSP and FT do before comparing maps of different resolutions."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return tuple(F.adaptive_avg_pool2d(f, size) if f.shape[-2:] != size else f for f in (a, b))  # type: ignore[return-value]


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """FSP matrices (Yim et al. 2017, Eq. 1) of maps `bottom` (N, C_b, H, W) and `top`
    (N, C_t, H', W'): (N, C_t, C_b), the spatial mean of the channel products. The larger map is
    average-pooled to the smaller one's size. Computed in float32 (float64 stays float64), with
    autocast off, so half-precision maps whose products overflow float16 still give finite values.
    """
    dtype = loss_dtype(bottom, top)
    with torch.autocast(bottom.device.type, enabled=False):
        bottom, top = pool_to_smaller(bottom.to(dtype), top.to(dtype))
        return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / top[0, 0].numel()


def fsp_matrices(maps: Sequence[Tensor]) -> list[Tensor]:
    """The FSP matrix of every pair of consecutive maps, shallow to deep."""
    return [fsp_matrix(bottom, top) for bottom, top in zip(maps[:-1], maps[1:])]


def fsp_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """The FSP loss (Yim et al. 2017, Eq. 2, in the CRD benchmark's form): the sum over
    consecutive map pairs of the mean squared difference between the student's and the
    teacher's FSP matrices. Both lists hold at least two maps, with equal channel counts
    position by position (the matrices must have the same shape); the teacher side is a constant.
    """
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise ValueError(
            "the FSP loss needs the same number (at least two) of student and teacher maps, got "
            f"{len(student_maps)} and {len(teacher_maps)}"
        )
    total = None
    for s, t in zip(fsp_matrices(student_maps), fsp_matrices([m.detach() for m in teacher_maps])):
        if s.shape != t.shape:
            raise ValueError(
                f"FSP matrices of different shapes, student {tuple(s.shape)} and teacher {tuple(t.shape)}: "
                "the student's and the teacher's maps need the same channel counts"
            )
        term = (s - t).pow(2).mean()
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


__all__ = ["fsp_loss", "fsp_matrices", "fsp_matrix", "pool_to_smaller"]
