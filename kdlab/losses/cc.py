"""Correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, "Correlation Congruence for
Knowledge Distillation", ICCV 2019, arXiv 1904.01802), in the form of the code behind the CRD
benchmark's numbers: RepDistiller `distiller_zoo/CC.py` (`Correlation`, "the authors nicely shared
the code with me").

The paper matches the two networks' sample-correlation matrices, psi(F) = [k(f_i, f_j)]_ij with a
Gaussian RBF kernel expanded as a Taylor series (its L_CC, Sec. 3). The shared code, which produced the
benchmark's numbers and for which its weight 0.02 is calibrated, computes instead, for embeddings
f^s, f^t (N, D) of one batch,

    delta_i = |f^s_i - f^t_i|                                  (element-wise)
    L_CC    = 1/(N - 1) * sum_(i=1..N-1) <delta_i, delta_(i+1)>

the mean over consecutive samples of the inner product of their absolute embedding differences:
the congruence of the batch's (i, i + 1) pairs. `cc_loss` is that formula. There is no kernel and
no Taylor expansion in that code, and kdlab does not implement the paper's kernel form.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cc_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The CC loss of RepDistiller's `Correlation` (Peng et al. 2019, as the authors' shared code
    computes it, see the module docstring), of student and teacher embeddings (N, D).

    Both sides get gradients: in the benchmark the teacher's features pass through a trained
    embedding. Computed in float32 (float64 stays float64). A batch of one sample has no
    consecutive pair and gives 0 (the reference: the NaN mean of nothing).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            "cc_loss compares two embeddings of one batch in one (N, D) shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    delta = (student.to(dtype) - teacher.to(dtype)).abs()
    return (delta[:-1] * delta[1:]).sum() / max(len(delta) - 1, 1)


__all__ = ["cc_loss"]
