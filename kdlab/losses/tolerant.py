"""Losses of the tolerant patriarch (Yang, Xie, Qiao, Yuille, "Knowledge Distillation in
Generations: More Tolerant Teachers Educate Better Students", arXiv 1805.05551; AAAI 2019 as
"Training Deep Neural Networks in Generations: A More Tolerant Teacher Educates Better Students")
and the two softer-teacher alternatives that paper compares against.

The paper's full text was not available to kdlab, so the exact form of its Eq. 3 (the
patriarch's loss) is kdlab's reading of the stated facts (see docs/tolerant.md):

    L = eta * CE(y, p) + (1 - eta) * TSD,
    TSD = s_primary - (1 / (K - 1)) * sum of the K - 1 highest other scores,

with scores the logits (default) or the probabilities, the primary class the ground truth
(default) or the top-1 prediction, and K = 5. For free logits of one sample, the logit form
is minimised in the limit p_primary = (2 eta - 1) / eta, each secondary class at
(1 - eta) / (eta (K - 1)) and every other class at 0; for eta <= 1/2 it is unbounded below
(the target logit can fall without limit), so the logit form requires 1/2 < eta <= 1.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.kd import reduce_loss

Scores = Literal["logits", "probabilities"]
Primary = Literal["target", "top1"]


def check_eta(eta: float, scores: str = "logits") -> None:
    """Raise ValueError unless `eta` gives the tolerant loss a minimum (see module docstring).

    Logit scores need 1/2 < eta <= 1 (for eta <= 1/2 the loss is unbounded below);
    probability scores are bounded, so 0 < eta <= 1.
    """
    if scores not in ("logits", "probabilities"):
        raise ValueError(f"scores must be 'logits' or 'probabilities', got {scores!r}")
    low = 0.5 if scores == "logits" else 0.0
    if not (low < float(eta) <= 1.0):
        raise ValueError(
            f"eta={eta} is outside ({low}, 1] for {scores} scores: "
            + ("with eta <= 0.5 the logit-form loss has no minimum (the target logit falls "
               "without limit); use 0.5 < eta <= 1, e.g. 0.6" if scores == "logits"
               else "use 0 < eta <= 1")
        )


def check_k(k: int, num_classes: int) -> None:
    """Raise ValueError unless 2 <= K <= number of classes (K - 1 secondary classes must exist)."""
    if int(k) != k or k < 2:
        raise ValueError(f"k={k}: the top-score difference needs k >= 2 (one primary and k - 1 secondary classes)")
    if k > num_classes:
        raise ValueError(
            f"k={k} is larger than the number of classes ({num_classes}); use k <= {num_classes}"
        )


def _primary_index(logits: Tensor, target: Tensor, primary: str) -> Tensor:
    if primary == "target":
        return target
    if primary == "top1":
        return logits.argmax(1)
    raise ValueError(f"primary must be 'target' or 'top1', got {primary!r}")


def tsd_terms(
    logits: Tensor, target: Tensor, k: int = 5, scores: Scores = "logits", primary: Primary = "target"
) -> tuple[Tensor, Tensor]:
    """Per-sample (primary score, mean of the K - 1 highest other scores), float32.

    The primary class is excluded from the secondary set by masking it to -inf before
    `topk`; gradients flow into the selected scores (the selection itself is piecewise constant).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    check_k(k, logits.size(1))
    z = logits.float()
    s = z if scores == "logits" else (z.softmax(1) if scores == "probabilities" else None)
    if s is None:
        raise ValueError(f"scores must be 'logits' or 'probabilities', got {scores!r}")
    idx = _primary_index(z, target, primary)[:, None]
    s_primary = s.gather(1, idx).squeeze(1)
    others = s.scatter(1, idx, float("-inf"))
    secondary = others.topk(k - 1, dim=1).values.mean(1)
    return s_primary, secondary


def tsd_loss(
    logits: Tensor,
    target: Tensor,
    k: int = 5,
    scores: Scores = "logits",
    primary: Primary = "target",
    reduction: str = "mean",
) -> Tensor:
    """Top-score difference (Yang et al. 2018, the extra patriarch term of Eq. 3, kdlab's reading).

    TSD = s_p - (1 / (K - 1)) * sum_{k=2..K} s_(k): the primary class's score minus the mean of the
    K - 1 highest-scoring other classes. Scores are logits (`scores='logits'`, default) or
    softmax probabilities; the primary class is the ground truth (`primary='target'`, default)
    or the top-1 prediction. Minimising it (with weight 1 - eta) narrows the gap between the
    primary and the secondary classes. Batch mean by default; ValueError if k < 2 or k > classes.
    """
    s_primary, secondary = tsd_terms(logits, target, k, scores, primary)
    return reduce_loss(s_primary - secondary, reduction)


def tolerant_teacher_loss(
    logits: Tensor,
    target: Tensor,
    eta: float = 0.6,
    k: int = 5,
    scores: Scores = "logits",
    primary: Primary = "target",
    reduction: str = "mean",
) -> Tensor:
    """The tolerant patriarch's loss (Yang et al. 2018, Eq. 3, kdlab's reading):
    eta * CE(y, p) + (1 - eta) * TSD.

    eta = 1 is plain cross-entropy (the strict teacher). Logit scores require 1/2 < eta <= 1,
    probability scores 0 < eta <= 1 (ValueError otherwise; see `check_eta`).
    """
    check_eta(eta, scores)
    check_k(k, logits.size(1))
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    if eta == 1.0:
        return reduce_loss(ce, reduction)
    tsd = tsd_loss(logits, target, k, scores, primary, reduction="none")
    return reduce_loss(eta * ce + (1.0 - eta) * tsd, reduction)


def prediction_entropy(logits: Tensor, reduction: str = "mean") -> Tensor:
    """Shannon entropy H(p) = -sum_i p_i log p_i of softmax(logits), in nats, float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return reduce_loss(-(log_p.exp() * log_p).sum(1), reduction)


def confidence_penalty_loss(logits: Tensor, target: Tensor, beta: float = 0.1, reduction: str = "mean") -> Tensor:
    """Confidence penalty (Pereyra, Tucker, Chorowski, Kaiser, Hinton, "Regularizing Neural
    Networks by Penalizing Confident Output Distributions", ICLR-W 2017, Eq. 2):
    CE(y, p) - beta * H(p). One of the softer-teacher alternatives Yang et al. compare.
    """
    if beta < 0:
        raise ValueError(f"confidence-penalty weight beta must be >= 0, got {beta}")
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return reduce_loss(ce - beta * prediction_entropy(logits, reduction="none"), reduction)


def label_smoothing_loss(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """Label smoothing (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016,
    Sec. 7): CE against (1 - eps) * one_hot(y) + eps / C. The other softer-teacher alternative
    Yang et al. compare; a thin name for `cross_entropy(..., label_smoothing=eps)`."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def tolerant_optimum(eta: float, k: int) -> tuple[float, float]:
    """(p_primary, p_each_secondary) minimising the logit-form tolerant loss of one sample:
    ((2 eta - 1) / eta, (1 - eta) / (eta (K - 1))); all other classes go to 0."""
    check_eta(eta, "logits")
    return (2 * eta - 1) / eta, (1 - eta) / (eta * (k - 1))


__all__ = [
    "check_eta",
    "check_k",
    "confidence_penalty_loss",
    "label_smoothing_loss",
    "prediction_entropy",
    "tolerant_optimum",
    "tolerant_teacher_loss",
    "tsd_loss",
    "tsd_terms",
]
