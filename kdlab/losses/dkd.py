"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022, arXiv 2203.08679).

For a sample of class t, with p = softmax(z / T):

- b = [p_t, 1 - p_t], the binary target / all-non-target probabilities (Sec. 3.1 of the paper);
- p_hat_i = p_i / (1 - p_t) for i != t, the distribution over the non-target classes,
  which is the softmax of the non-target logits alone.

Classic KD rewrites exactly as (the reformulation of Sec. 3.1)

    KL(p^T || p^S) = KL(b^T || b^S) + (1 - p_t^T) * KL(p_hat^T || p_hat^S)
                   =       TCKD     + (1 - p_t^T) *          NCKD

and DKD (Sec. 3.3) is alpha * TCKD + beta * NCKD. Every term here is multiplied by T^2
and averaged over the batch, like `kd_loss`.

Numerics. Everything is computed in (at least) float32 from log-sum-exps of the logits, never from
probabilities: log p_t = z_t/T - lse(z/T), log(1 - p_t) = lse(z_nt/T) - lse(z/T) where z_nt
are the C - 1 non-target logits, and log p_hat = log_softmax(z_nt/T). The non-target logits
are *gathered* into an (N, C - 1) tensor instead of masking the target with -inf (or, as
the reference code does, subtracting 1000), so no entry is ever -inf and no masked entry
can produce -inf - (-inf) = NaN in the KL or in its gradient. The result is finite, with
finite gradients, for logits of +-1e4, for a teacher that is 100% sure, and under
bf16/fp16 autocast (inputs are upcast).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.kd import reduce_loss

#: Set once the two-class warning has been shown (NCKD is identically 0 with C = 2).
_warned_two_classes = False


class DKDTerms(NamedTuple):
    """Per-sample pieces of the KD decomposition, all shape (N,), float32 (or float64).

    tckd: T^2 * KL(b^T || b^S); nckd: T^2 * KL(p_hat^T || p_hat^S);
    teacher_target_prob: p_t^T at temperature T (detached);
    teacher_non_target_prob: 1 - p_t^T (detached), the weight of NCKD in classic KD, computed
    as exp(log(1 - p_t^T)) so it keeps its precision when the teacher is nearly sure.
    """

    tckd: Tensor
    nckd: Tensor
    teacher_target_prob: Tensor
    teacher_non_target_prob: Tensor


def _check(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be (batch, classes), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be (batch,), got {tuple(target.shape)} for logits {tuple(student_logits.shape)}")
    if student_logits.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes")


def _warn_two_classes() -> None:
    global _warned_two_classes
    if not _warned_two_classes:
        _warned_two_classes = True
        warnings.warn(
            "DKD with 2 classes: the non-target distribution has a single class, so NCKD is "
            "identically 0 and only TCKD (alpha) distils anything",
            RuntimeWarning,
            stacklevel=3,
        )


def _non_target_index(target: Tensor, num_classes: int) -> Tensor:
    """(N, C-1) indices of every class except the target, in class order."""
    j = torch.arange(num_classes - 1, device=target.device).expand(target.shape[0], -1)
    return j + (j >= target[:, None]).long()


def _log_parts(logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log b of shape (N, 2), log p_hat of shape (N, C-1)) of logits / T, in float32 or
    wider (half-precision inputs are upcast; float64 stays float64, for gradcheck)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    z_nt = z.gather(1, _non_target_index(target, z.shape[1]))
    lse_all = torch.logsumexp(z, dim=1)
    lse_nt = torch.logsumexp(z_nt, dim=1)
    log_pt = z.gather(1, target[:, None]).squeeze(1) - lse_all
    log_pnt = lse_nt - lse_all  # log(1 - p_t) without ever forming 1 - p_t
    log_b = torch.stack([log_pt, log_pnt], dim=1)
    log_p_hat = z_nt - lse_nt[:, None]  # = log_softmax(z_nt)
    return log_b, log_p_hat


def _kl_rows(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
    """sum_i p^T_i (log p^T_i - log p^S_i) per row, both arguments in log space.

    `F.kl_div(log_target=True)` uses exp(log p^T) * (log p^T - log p^S): a teacher
    probability that underflows to 0 contributes exactly 0 (its log is finite here)."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1)


def dkd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
) -> DKDTerms:
    """Per-sample TCKD, NCKD (both times T^2) and the teacher's p_t at temperature T.

    DKD paper, Sec. 3.1: KD = TCKD + (1 - p_t^T) * NCKD holds sample by sample. Shares one
    log-sum-exp pass between the two terms; `tckd_loss`, `nckd_loss` and `dkd_loss` are
    thin wrappers around it.
    """
    _check(student_logits, teacher_logits, target, temperature)
    target = target.long()
    if student_logits.shape[1] == 2:
        _warn_two_classes()
    log_b_s, log_hat_s = _log_parts(student_logits, target, temperature)
    with torch.no_grad():
        # The teacher is a constant of the loss: no graph through it even if it had one.
        log_b_t, log_hat_t = _log_parts(teacher_logits.detach(), target, temperature)
    t2 = temperature**2
    tckd = _kl_rows(log_b_s, log_b_t) * t2
    nckd = _kl_rows(log_hat_s, log_hat_t) * t2
    return DKDTerms(tckd, nckd, log_b_t[:, 0].exp(), log_b_t[:, 1].exp())


def tckd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Target-class KD (DKD paper, Sec. 3.1, the first term of KD = TCKD + (1 - p_t) NCKD):
    T^2 * KL(b^T || b^S) with b = [p_t, 1 - p_t] at temperature T.
    `reduction`: 'mean' (over the batch) | 'sum' | 'none' (one value per sample)."""
    return reduce_loss(dkd_terms(student_logits, teacher_logits, target, temperature).tckd, reduction)


def nckd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Non-target-class KD (DKD paper, Sec. 3.1, second term, without KD's (1 - p_t^T) weight):
    T^2 * KL(p_hat^T || p_hat^S), p_hat the softmax over the non-target classes at T.
    Identically 0 with two classes (warns once). `reduction`: 'mean' | 'sum' | 'none'."""
    return reduce_loss(dkd_terms(student_logits, teacher_logits, target, temperature).nckd, reduction)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled KD (DKD paper, Sec. 3.3): alpha * TCKD + beta * NCKD, each T^2-scaled.

    Defaults are the paper's CIFAR-100 ResNet32x4 -> ResNet8x4 setting. With alpha = 1 and
    the per-sample beta = 1 - p_t^T this is classic KD (see `dkd_terms`).
    `reduction`: 'mean' (over the batch) | 'sum' | 'none' (one value per sample).
    """
    terms = dkd_terms(student_logits, teacher_logits, target, temperature)
    return reduce_loss(alpha * terms.tckd + beta * terms.nckd, reduction)


__all__ = ["DKDTerms", "dkd_loss", "dkd_terms", "nckd_loss", "tckd_loss"]
