"""Hinton knowledge distillation loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reduce_loss(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply 'mean' | 'sum' | 'none' to a per-sample loss vector."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def loss_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype losses compute in: at least float32 (half-precision and bf16 inputs are upcast,
    so log-softmaxes stay accurate under autocast), float64 when any input is float64 (so exact
    identities and gradchecks hold to float64 precision)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Classic KD (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network").

    T^2 * KL(softmax(z_T / T) || softmax(z_S / T)), summed over classes and averaged over
    the batch (`reduction='none'` returns one value per sample). The T^2 factor keeps the
    gradient scale independent of T (Hinton et al., Sec. 2). Computed from log-softmax in
    float32 (float64 inputs stay float64, see `loss_dtype`), so it is finite for any finite
    logits and under autocast.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = loss_dtype(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    per_sample = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    return reduce_loss(per_sample * temperature**2, reduction)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy in float32 (stable under autocast)."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def teacher_target_confidence(teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean softmax probability (T = 1) the teacher gives the true class (a diagnostic)."""
    p = teacher_logits.float().softmax(1)
    return p.gather(1, targets[:, None]).mean().detach()

__all__ = ["kd_loss", "cross_entropy", "loss_dtype", "reduce_loss", "teacher_target_confidence"]


