"""KDSVD (Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018, arXiv 1807.06819), as mdistiller implements it
(`mdistiller/distillers/KDSVD.py`, after the authors' TensorFlow code sseung0703/SSKD_SVD).

Each stage map (N, C, H, W) is read as N matrices A = reshape(N, C*H, W) (mdistiller's view;
RepDistiller's KDSVD reads (N, H*W, C), which needs equal channel counts, and is not implemented).
Their leading right singular vectors summarise the map (the paper's Sec. 3.1 compression):

1. teacher: the top k right singular vectors v_t (unit columns, (N, W, k)) and its top k singular
   values normalised to unit norm, s_t (for k = 1 that is 1);
2. student: its top k + 3 right singular vectors, of which, for each teacher vector, the one of
   largest |cosine| is kept with the cosine's sign (`align_to_teacher`, the reference's
   `align_rsv`);
3. both scaled by s_t; between consecutive stages l-1 and l, the Gaussian RBF
   g(a, b) = exp(-(a - b)^2 / 8) of every pair of entries (the paper's distillation feature
   (Sec. 3): the correlation of two layers' singular vectors through a Gaussian RBF);
4. loss = sum over consecutive stage pairs of ||g_student - g_teacher||^2 (non-finite entries
   dropped), divided by the batch size (the reference's l2 loss).

The SVD: the right singular vectors of A are the eigenvectors of the (W, W) Gram matrix A^T A,
whose eigenvalues are the squared singular values; kdlab forms the Gram matrix in the features'
precision (float32, or float64 for float64 input) and solves it with `torch.linalg.eigh` in
float64 (W <= 32 on CIFAR: a batch of tiny symmetric problems, much cheaper than an SVD of the
tall (C*H, W) matrices; the leading vectors these losses use agree with the SVD's to rounding).
Two things make it well-defined where the reference is not:

- signs: a singular vector is defined up to its sign, and the reference keeps whatever its
  LAPACK call returns, so its loss (whose RBF compares the teacher's vectors of two stages)
  depends on it. Here every vector is flipped so that its entry of largest magnitude is
  positive (the student's sign then comes from the alignment, as in the reference).
- gradients: the derivative of a singular vector divides by differences of squared singular
  values, infinite for repeated ones (a rank-deficient map: torch's SVD backward gives NaN
  there). `top_right_singular_vectors` has its own backward, the usual formula with the terms
  of (numerically) equal eigenvalues set to 0, that is, no rotation inside a degenerate
  subspace: finite, and equal to the SVD's gradient wherever that is finite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: mdistiller KDSVD.K: the teacher keeps this many singular vectors, the student k + 3.
KDSVD_K = 1
#: The RBF bandwidth of the reference: exp(-(a - b)^2 / 8).
RBF_DENOMINATOR = 8.0


class _TopRightSingular(torch.autograd.Function):
    """(V[:, :, :n], S[:, :n]) of the batched matrices x (N, m, w), V in descending order of the
    singular values S, each column's largest-magnitude entry positive; gradients flow to x
    through V only (S is returned without a gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int):  # type: ignore[override]
        x = x.detach()
        gram = (x.mT @ x).double()  # (N, w, w): the product in x's precision, the rest in float64
        # Non-finite features (a diverging run) would make eigh raise; the reference zeroes NaN
        # outputs instead. Zeroing them here keeps the step alive for the engine's non-finite
        # guard, which the other loss terms of such a step trip.
        gram = torch.where(torch.isfinite(gram), gram, torch.zeros_like(gram))
        eigenvalues, vectors = torch.linalg.eigh(gram)
        eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)  # descending
        peak = vectors.abs().argmax(dim=1, keepdim=True)
        sign = torch.where(vectors.gather(1, peak) < 0, -1.0, 1.0)
        vectors = vectors * sign
        ctx.save_for_backward(x, eigenvalues, vectors)
        ctx.n = n
        values = eigenvalues.clamp(min=0).sqrt()[..., :n].to(x.dtype)
        ctx.mark_non_differentiable(values)
        return vectors[..., :n].to(x.dtype), values

    @staticmethod
    def backward(ctx, grad_vectors: Tensor, grad_values: Tensor):  # type: ignore[override]
        x, eigenvalues, vectors = ctx.saved_tensors
        w = vectors.shape[-1]
        g = torch.zeros_like(vectors)
        g[..., : ctx.n] = grad_vectors.double()
        gap = eigenvalues[..., None, :] - eigenvalues[..., :, None]  # (i, j): lambda_j - lambda_i
        scale = eigenvalues.abs().amax(-1, keepdim=True)[..., None].clamp(min=torch.finfo(torch.float64).tiny)
        tie = gap.abs() <= 64 * w * torch.finfo(torch.float64).eps * scale
        inverse_gap = torch.where(tie, 0.0, 1.0 / torch.where(tie, 1.0, gap))
        grad_gram = vectors @ (inverse_gap * (vectors.mT @ g)) @ vectors.mT
        return x @ (grad_gram + grad_gram.mT).to(x.dtype), None


def top_right_singular_vectors(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The leading min(n, w) right singular vectors (N, w, n) and singular values (N, n) of the
    batched matrices x (N, m, w), with the sign convention and the safe gradient of the module
    docstring. Computed in float64, returned in x's dtype (at least float32)."""
    if x.dim() != 3:
        raise ValueError(f"top_right_singular_vectors needs a batch of matrices (N, m, w), got {tuple(x.shape)}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return _TopRightSingular.apply(x, n)  # type: ignore[no-any-return]


def stage_matrices(feature: Tensor) -> Tensor:
    """mdistiller's view of a stage map (N, C, H, W) as matrices (N, C*H, W)."""
    if feature.dim() != 4:
        raise ValueError(f"KDSVD reads (N, C, H, W) stage maps, got {tuple(feature.shape)}")
    n, c, h, w = feature.shape
    return feature.reshape(n, c * h, w)


def align_to_teacher(student: Tensor, teacher: Tensor) -> Tensor:
    """The reference's `align_rsv`: for each teacher vector (a column of `teacher`, (N, w, k)),
    the student vector (a column of `student`, (N, w, k')) of largest |cosine|, times the
    cosine's sign (all of them, summed, on an exact tie), as (N, w, k)."""
    cosine = student.mT @ teacher
    largest = cosine.abs().amax(1, keepdim=True)
    pick = torch.where(cosine.abs() == largest, torch.sign(cosine), torch.zeros_like(cosine))
    return student @ pick.detach()


def _rbf(current: Tensor, previous: Tensor) -> Tensor:
    return torch.exp(-(current[:, :, None, :] - previous[:, None, :, :]).pow(2) / RBF_DENOMINATOR)


def kdsvd_loss(student_stages: list[Tensor], teacher_stages: list[Tensor], k: int = KDSVD_K) -> Tensor:
    """The KDSVD loss of mdistiller (Lee et al. 2018, Sec. 3's RBF of consecutive layers' singular
    vectors and its l2 loss, as that code computes them; see the module docstring) over zipped
    stage maps of student and teacher, shallow to deep. Zipped stages must have equal widths W (the
    alignment compares vectors of length W). The teacher side is a constant. Computed in float32
    (float64 inputs stay float64) with autocast off."""
    if k < 1:
        raise ValueError(f"KDSVD keeps k >= 1 teacher singular vectors, got k={k}")
    pairs = list(zip(student_stages, teacher_stages))
    if not pairs:
        raise ValueError("kdsvd_loss needs at least one pair of stage maps")
    total = student_stages[0].new_zeros((), dtype=torch.promote_types(student_stages[0].dtype, torch.float32))
    previous: tuple[Tensor, Tensor] | None = None
    with torch.autocast(student_stages[0].device.type, enabled=False):
        for fs, ft in pairs:
            if fs.shape[-1] != ft.shape[-1]:
                raise ValueError(
                    f"KDSVD aligns singular vectors of length W and needs equal map widths stage by "
                    f"stage, got {tuple(fs.shape)} (student) and {tuple(ft.shape)} (teacher)"
                )
            with torch.no_grad():
                v_t, s_t = top_right_singular_vectors(stage_matrices(ft.detach()), k)
                scale = F.normalize(s_t, dim=1)[:, None, :]
            v_s, _ = top_right_singular_vectors(stage_matrices(fs), k + 3)
            v_s = align_to_teacher(v_s, v_t.to(v_s.dtype)) * scale
            v_t = v_t * scale
            if previous is not None:
                squared = (_rbf(v_s, previous[0]) - _rbf(v_t, previous[1])).pow(2)
                total = total + torch.where(torch.isfinite(squared), squared, torch.zeros_like(squared)).sum()
            previous = (v_s, v_t)
    return total / student_stages[0].shape[0]


__all__ = ["KDSVD_K", "RBF_DENOMINATOR", "align_to_teacher", "kdsvd_loss", "stage_matrices",
           "top_right_singular_vectors"]
