"""The hint loss of FitNets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints
for Thin Deep Nets", ICLR 2015, arXiv 1412.6550).

The paper's Eq. (3) is

    L_HT(W_Guided, W_r) = 1/2 * || u_h(x; W_Hint) - r(v_g(x; W_Guided); W_r) ||^2

with u_h the teacher's hint layer, v_g the student's guided layer and r a (convolutional)
regressor. The CIFAR-100 benchmarks whose numbers kdlab reproduces (the CRD benchmark,
RepDistiller, and mdistiller) use `F.mse_loss`, the mean over all elements without the 1/2,
and their feature weight of 100 is calibrated for that mean; `hint_loss` is that mean. The
paper's value averaged over the batch is `hint_loss * C * H * W / 2` (C, H, W of the map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al. 2015, Eq. 3, in the benchmarks' mean form): the mean
    squared difference over every element of the regressed student map and the teacher's
    hint map, both (N, C, H, W) of the same shape.

    The teacher side is a constant (detached). Computed in float32 (float64 inputs stay
    float64), so half-precision maps whose squares overflow float16 still give a finite loss.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            "the hint loss needs the regressed student map and the teacher's map in the same "
            f"shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    return F.mse_loss(student.to(dtype), teacher.detach().to(dtype))


__all__ = ["hint_loss"]
