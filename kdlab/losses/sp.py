"""Similarity-preserving distillation (Tung, Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019, arXiv 1907.09682).

For a batch of b samples, the activation map of each is flattened to a row of Q (b, C*H*W); the
pairwise similarity matrix G~ = Q Q^T (Eq. 2) is L2-normalised row by row, G[i] = G~[i] /
||G~[i]||_2 (Eq. 3), and the loss is (Eq. 4)

    L_SP = 1 / b^2 * || G_T - G_S ||_F^2

for each chosen pair of teacher and student layers (summed over pairs). The reference code
(RepDistiller `distiller_zoo/SP.py`, mdistiller `distillers/SP.py`) computes exactly this, with
`F.normalize`'s norm clamp at 1e-12; so does `sp_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.kd import loss_dtype


def similarity_matrix(feature: Tensor) -> Tensor:
    """Tung & Mori's Eq. (2)-(3): Q Q^T of the (b, ...) features flattened per sample, each row
    L2-normalised, shape (b, b)."""
    q = feature.flatten(1)
    return F.normalize(q @ q.T, dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving loss of one layer pair (Tung & Mori 2019, Eq. 4): the squared
    Frobenius distance of the two row-normalised batch similarity matrices, divided by b^2.

    Each side may have any shape with the batch first (the feature sizes need not agree). The
    teacher is a constant (detached). Computed in float32 with autocast off (float64 inputs
    stay float64): the Gram products of half-precision maps overflow float16.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"batch sizes differ: {student.shape[0]} and {teacher.shape[0]}")
    b = student.shape[0]
    dtype = loss_dtype(student, teacher)
    with torch.autocast(student.device.type, enabled=False):
        diff = similarity_matrix(teacher.detach().to(dtype)) - similarity_matrix(student.to(dtype))
        return diff.pow(2).sum() / (b * b)


__all__ = ["similarity_matrix", "sp_loss"]
