"""Hierarchical context loss of ReviewKD (Chen, Liu, Zhao, Jia, "Distilling Knowledge via
Knowledge Review", CVPR 2021, arXiv 2104.09044, Sec. 3, "hierarchical context loss"). The
weights and the skipped pooling sizes below follow the authors' code, which the paper's
description leaves open.

For one level with maps f_s, f_t of shape (N, C, H, W):

    HCL(f_s, f_t) = [ MSE(f_s, f_t) + sum_k w_k * MSE(pool_{l_k}(f_s), pool_{l_k}(f_t)) ]
                    / (1 + sum_k w_k)

where pool_l is adaptive average pooling to l x l, l_1 > l_2 > ... are the sizes of
{4, 2, 1} strictly smaller than the map (l < min(H, W)), and w_k = 1/2^k is halved for
each level *used*. This is the reference code's behaviour (its loop `continue`s past
l >= h before halving): an 8x8 map uses 4, 2, 1 with weights 1/2, 1/4, 1/8 (total
1.875); a 4x4 map skips the 4x4 pooling and uses 2, 1 with weights 1/2, 1/4 (total 1.75);
a 2x2 map uses 1 with 1/2 (total 1.5); a 1x1 map is plain MSE. MSE is the mean over all
elements. Levels are summed, not averaged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Pooling sizes of the hierarchy, largest first (reference code: [4, 2, 1]).
HCL_POOL_SIZES: tuple[int, ...] = (4, 2, 1)


def hcl_level(student: Tensor, teacher: Tensor, pool_sizes: Sequence[int] = HCL_POOL_SIZES) -> Tensor:
    """HCL of one level (ReviewKD Sec. 3): full-resolution MSE plus MSEs of average-pooled
    maps for each size in `pool_sizes` smaller than the map, weights 1/2, 1/4, ... over the
    sizes used, normalised by the weights' sum. Computed in float32 (or float64)."""
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            "HCL needs student and teacher maps of the same (N, C, H, W) shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    fs, ft = student.to(dtype), teacher.detach().to(dtype)
    loss = F.mse_loss(fs, ft)
    weight, total = 1.0, 1.0
    smallest_side = min(fs.shape[-2:])
    for size in pool_sizes:
        if size >= smallest_side:  # pooling to the map's own size would repeat the MSE
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


def hcl_level_losses(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    pool_sizes: Sequence[int] = HCL_POOL_SIZES,
) -> list[Tensor]:
    """Per-level HCL values (see `hcl_level`) of two equal-length lists of maps."""
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"HCL needs as many student as teacher levels, got {len(student_features)} and "
            f"{len(teacher_features)}"
        )
    return [hcl_level(fs, ft, pool_sizes) for fs, ft in zip(student_features, teacher_features)]


def hcl_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    pool_sizes: Sequence[int] = HCL_POOL_SIZES,
) -> Tensor:
    """Hierarchical context loss (ReviewKD Sec. 3), summed over levels: the distance D of
the review loss, sum_j D(fused_j, F_t^j).

    `student_features[i]` is compared with `teacher_features[i]`; both lists have the same
    length and each pair the same shape. The teacher side is treated as a constant.
    """
    levels = hcl_level_losses(student_features, teacher_features, pool_sizes)
    if not levels:
        raise ValueError("HCL needs at least one level")
    return torch.stack(levels).sum()


__all__ = ["HCL_POOL_SIZES", "hcl_level", "hcl_level_losses", "hcl_loss"]
