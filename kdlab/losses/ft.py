"""Factor transfer (FT) of Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression
via Factor Transfer", NeurIPS 2018 (arXiv 1802.04977).

A paraphraser P (an autoencoder on the teacher's last feature map x) is first trained alone with
the reconstruction loss L_rec = || x - P(x) ||^2; its encoder then yields the teacher factor F_T,
and a translator on the student's map yields the student factor F_S, trained with

    L_FT = || F_T / ||F_T||_2 - F_S / ||F_S||_2 ||_p ,   p = 1.

As in the CRD benchmark (RepDistiller `distiller_zoo/FT.py` and `train_student.py`), whose numbers
kdlab reproduces: L_rec is the element mean of the squared error (`nn.MSELoss`), and a factor is
not normalised as a whole but reduced first to a spatial map, the channel mean of its squares (p1 = 2),
flattened and l2-normalised per sample; L_FT is the element mean of the absolute difference of the
two (p2 = 1), the larger factor average-pooled to the smaller's size first.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.fitnet import hint_loss
from kdlab.losses.fsp import pool_to_smaller
from kdlab.losses.kd import loss_dtype


def reconstruction_loss(reconstruction: Tensor, feature: Tensor) -> Tensor:
    """The paraphraser's L_rec (Kim et al. 2018, Sec. 3.1) in the benchmark's form: the mean over
    every element of the squared error, the teacher's `feature` a constant, in float32."""
    return hint_loss(reconstruction, feature)


def factor_map(factor: Tensor) -> Tensor:
    """RepDistiller's `FactorTransfer.factor`: the channel mean of the squared factor (N, C, H, W),
    flattened to (N, H * W) and l2-normalised per sample."""
    return F.normalize(factor.pow(2).mean(1).flatten(1), dim=1)


def ft_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """L_FT (Kim et al. 2018, Sec. 3.2, p = 1) in the CRD benchmark's form: the mean absolute
    difference of the two factors' normalised maps (`factor_map`), the larger factor pooled to the
    smaller's size. Channel counts may differ. The teacher side is a constant; computed in float32
    (float64 stays float64)."""
    dtype = loss_dtype(student_factor, teacher_factor)
    s, t = pool_to_smaller(student_factor.to(dtype), teacher_factor.detach().to(dtype))
    return (factor_map(s) - factor_map(t)).abs().mean()


__all__ = ["factor_map", "ft_loss", "reconstruction_loss"]
