"""Contrastive representation distillation (Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020, arXiv 1910.10699): the NCE loss and the memory-bank arithmetic, as
pure functions. The memory bank itself (a buffer of every training sample's embedding, one
bank for the student and one for the teacher) is state, and lives in `kdlab.methods.crd`.

Notation, following the authors' code (RepDistiller `crd/memory.py` and `crd/criterion.py`,
reused unchanged by mdistiller): B samples in a batch, K negatives per sample, N training
samples, D the embedding width, T the temperature. For an anchor embedding v (unit norm) and
the bank rows m_0 (the positive: the other network's embedding of the same sample) and
m_1..m_K (negatives: other samples), the scores are

    s_k = <m_k, v> / T                      `contrast_logits`
    P_k = exp(s_k) / Z                      Z = mean(exp(s)) * N, set once from the first
                                            batch and then frozen (`nce_log_normalizer`)

and the NCE loss of one anchor (the code's `ContrastLoss`, whose comment ties it to the
paper's Eq. 18; noise distribution P_n = 1/N, uniform over the training set) is

    L = - log( P_0 / (P_0 + K/N + eps) ) - sum_{k=1..K} log( (K/N) / (P_k + K/N + eps) )

with eps = 1e-7, averaged over the batch (`crd_nce_loss`). CRD sums this loss for the student
anchors (against the teacher bank) and the teacher anchors (against the student bank). After
the step each sample's bank row becomes normalize(mu * row + (1 - mu) * v), mu the momentum
(`momentum_update`). Negatives are drawn uniformly for each sample from a pool that excludes
the positive (`negative_pool`, `contrast_indices`).

Numerics: the reference computes exp(s / T) and logs of ratios, which overflows float16 and
loses the loss to log(0) for confident scores. Here log D_1 = log sigmoid(log P_0 - log c) and
log D_0 = log(K/N) - log c - softplus(log P_k - log c), with c = K/N + eps: the same values,
finite for any finite scores. Everything runs in float32 (float64 inputs stay float64), with
autocast turned off for the score product.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The constant added to K/N in the NCE ratios (RepDistiller `criterion.py`: eps = 1e-7).
NCE_EPS = 1e-7


def _float(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def contrast_logits(anchor: Tensor, memory: Tensor, sample_indices: Tensor, temperature: float) -> Tensor:
    """Scores s[b, k] = <memory[sample_indices[b, k]], anchor[b]> / T, shape (B, K + 1).

    anchor: (B, D) embeddings (gradients flow into them); memory: (N, D) bank rows (a constant,
    detached); sample_indices: (B, K + 1) rows of the bank, column 0 the positive.

    Two exact ways to the same numbers, chosen by memory: when N <= (K + 1) * D (CIFAR-100:
    50000 <= 16385 * 128) the product with the whole bank, (B, N), is smaller than the gathered
    rows, (B, K + 1, D), that the reference code builds (537 MB per bank at batch 64), so the
    scores of every sample are computed and the drawn ones picked; otherwise the rows are
    gathered as in the reference. Either way the scores hold their own copy of what they read,
    so the bank may be updated in place right after (before the backward).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if anchor.dim() != 2 or memory.dim() != 2 or anchor.shape[1] != memory.shape[1]:
        raise ValueError(
            f"contrast_logits needs anchors (B, D) and a bank (N, D), got {tuple(anchor.shape)} "
            f"and {tuple(memory.shape)}"
        )
    if sample_indices.dim() != 2 or sample_indices.shape[0] != anchor.shape[0]:
        raise ValueError(
            f"sample_indices must be (B, K + 1) with B = {anchor.shape[0]}, got {tuple(sample_indices.shape)}"
        )
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(anchor.device.type, enabled=False):
        v = anchor.to(dtype)
        if memory.shape[0] <= sample_indices.shape[1] * memory.shape[1]:
            # A copy: the backward needs the bank as it is now, and the caller may update it in place.
            bank = memory.detach().to(dtype, copy=True)
            scores = (v @ bank.T).gather(1, sample_indices)
        else:
            rows = memory.detach()[sample_indices].to(dtype)  # indexing copies
            scores = torch.bmm(rows, v[:, :, None]).squeeze(2)
    return scores / temperature


def nce_log_normalizer(logits: Tensor, num_data: int) -> Tensor:
    """log Z, with Z = mean over every entry of exp(logits) times N (RepDistiller's
    `ContrastMemory`, which sets Z from the first batch it sees and keeps it). A constant:
    no gradient. Computed as a float64 logsumexp, returned as a 0-dim float32 tensor."""
    if num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    flat = logits.detach().double().flatten()
    if flat.numel() == 0:
        raise ValueError("nce_log_normalizer needs at least one score")
    return (torch.logsumexp(flat, 0) - math.log(flat.numel()) + math.log(num_data)).float()


def crd_nce_loss(logits: Tensor, log_z: Tensor | float, num_data: int, eps: float = NCE_EPS) -> Tensor:
    """The NCE loss of CRD (Tian et al. 2020; RepDistiller `ContrastLoss`, "Eq. (18)"),
    averaged over the batch; see the module docstring for the formula.

    logits: (B, K + 1) scores s = <bank row, anchor> / T, column 0 the positive (K >= 1);
    log_z: log of the normalisation constant Z (`nce_log_normalizer`), a constant;
    num_data: N, the number of training samples (the noise distribution is 1/N).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"crd_nce_loss needs scores (B, K + 1) with K >= 1 negatives, got {tuple(logits.shape)}")
    if num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    k = logits.shape[1] - 1
    noise = k / num_data  # K * P_n
    log_c = math.log(noise + eps)
    log_z = log_z.detach() if isinstance(log_z, Tensor) else log_z
    d = _float(logits) - log_z - log_c  # log(P / c)
    log_d1 = F.logsigmoid(d[:, 0])  # log(P_0 / (P_0 + c))
    log_d0 = (math.log(noise) - log_c) - F.softplus(d[:, 1:])  # log((K/N) / (P_k + c))
    return -(log_d1 + log_d0.sum(1)).mean()


def momentum_update(rows: Tensor, new: Tensor, momentum: float) -> Tensor:
    """New bank rows: normalize(momentum * rows + (1 - momentum) * new), each to unit L2 norm
    (RepDistiller `ContrastMemory`: l_pos * mu + v * (1 - mu), divided by its norm). A row
    that cancels to zero stays zero instead of becoming NaN (`F.normalize`). No gradient."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    mixed = rows.detach() * momentum + new.detach().to(rows.dtype) * (1.0 - momentum)
    return F.normalize(mixed, dim=1)


def init_memory(num_data: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """A fresh bank (N, D): uniform in [-s, s] with s = 1 / sqrt(D / 3), as RepDistiller
    (its rows have unit norm in expectation, but are not normalised)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_data, dim, generator=generator).mul_(2 * stdv).sub_(stdv)


def negative_pool(positives: Tensor, num_data: int, labels: Tensor | None = None) -> Tensor:
    """(B, N) bool: which training samples may be drawn as negatives of each sample.

    labels None: every sample except the positive itself. labels (N,) given: only samples of
    another class (RepDistiller's CIFAR-100 sampler in its default `exact` mode draws the
    negatives of a sample of class c from `cls_negative[c]`, the samples of the other classes).
    """
    if labels is None:
        pool = torch.ones(positives.shape[0], num_data, dtype=torch.bool, device=positives.device)
        pool[torch.arange(positives.shape[0], device=positives.device), positives] = False
        return pool
    if labels.shape != (num_data,):
        raise ValueError(f"labels must have one entry per training sample ({num_data}), got {tuple(labels.shape)}")
    return labels[None, :] != labels[positives][:, None]


def contrast_indices(positives: Tensor, pool: Tensor, num_negatives: int, replacement: bool = False,
                     generator: torch.Generator | None = None) -> Tensor:
    """(B, K + 1) bank rows to score: column 0 the positive, then K negatives drawn uniformly
    from each row of `pool` (`negative_pool`), without replacement unless `replacement`.

    Without replacement every row of `pool` must hold at least K candidates: `torch.multinomial`
    would otherwise fill up with excluded samples silently (the caller checks once, not here,
    to keep the step free of host synchronisation). Draws from `generator`, or from the global
    RNG of the pool's device when None.
    """
    negatives = torch.multinomial(pool.float(), num_negatives, replacement=replacement, generator=generator)
    return torch.cat([positives[:, None].to(negatives.dtype), negatives], dim=1)


__all__ = [
    "NCE_EPS",
    "contrast_indices",
    "contrast_logits",
    "crd_nce_loss",
    "init_memory",
    "momentum_update",
    "negative_pool",
    "nce_log_normalizer",
]
