"""Calibration: reliability diagrams and expected calibration error.

Confidence is the maximum softmax probability (T = 1); samples are put in `bins`
equal-width confidence bins over [0, 1] (15 by default, as in Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017). For bin b with n_b samples, accuracy acc_b and mean
confidence conf_b:

    ECE = sum_b (n_b / N) |acc_b - conf_b|,    MCE = max_b |acc_b - conf_b| (non-empty bins).

ECE and MCE are torchmetrics' `multiclass_calibration_error` (norm "l1" and "max"), which
computes in float32 with bins closed on the left, [e_b, e_b+1), and a sample of confidence
exactly 1 in a bin of its own; the per-bin numbers for the diagram use the same bins, with
that last point shown in the top bin.

Why it matters here: distillation changes how confident a student is (DKD and tolerant
teachers both move probability mass onto non-target classes), so a report shows teacher and
student calibration side by side.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from kdlab.analysis.plotting import new_figure, save_figure


def reliability(logits: Any, targets: Any, bins: int = 15) -> dict[str, Any]:
    """Per-bin counts, accuracy and confidence, ECE and MCE (as fractions in [0, 1]).

    `logits`: (N, C) logits or softmax probabilities (torchmetrics applies the softmax to
    values outside [0, 1]); `targets`: (N,) class indices.
    """
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets).reshape(-1).long()
    if logits.ndim != 2 or logits.shape[0] != targets.numel():
        raise ValueError(f"logits must be (N, C) with one target per row, got {tuple(logits.shape)} "
                         f"and {targets.numel()} targets")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    logits = logits.float()
    num_classes = int(logits.shape[1])
    ece = mce = 0.0
    if targets.numel():
        ece, mce = (float(multiclass_calibration_error(logits, targets, num_classes, n_bins=bins, norm=norm))
                    for norm in ("l1", "max"))
    probs = logits if bool(((logits >= 0) & (logits <= 1)).all()) else logits.softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == targets).double()
    # torchmetrics' bins (float32 edges); its point bin for a confidence of exactly 1 is drawn in the top bin.
    idx = (torch.bucketize(conf, torch.linspace(0, 1, bins + 1), right=True) - 1).clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, torch.bincount(idx, correct, minlength=bins).numpy() / count.numpy(), np.nan)
        mean_conf = np.where(count > 0, torch.bincount(idx, conf.double(), minlength=bins).numpy() / count.numpy(),
                             np.nan)
    return {
        "bins": bins,
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "count": count.tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "ece": ece,
        "mce": mce,
        "mean_confidence": float(conf.double().mean()) if conf.numel() else float("nan"),
        "accuracy_overall": float(correct.mean()) if correct.numel() else float("nan"),
    }


def plot_reliability(diagrams: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """One reliability diagram per model (bars: accuracy per bin; diagonal: perfect
    calibration; red: the gap), with the ECE in each title."""
    names = list(diagrams)
    fig, axes = new_figure(1, len(names), width=4.2, height=4.2)
    for ax, name in zip(axes[0], names):
        d = diagrams[name]
        edges = np.asarray(d["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = np.nan_to_num(np.asarray(d["accuracy"], dtype=float))
        conf = np.asarray(d["confidence"], dtype=float)
        has = np.asarray(d["count"]) > 0
        ax.bar(centers[has], acc[has], width=width * 0.95, color="C0", edgecolor="k", lw=0.4, label="accuracy")
        gap_bottom = np.minimum(acc, np.nan_to_num(conf))[has]
        gap = np.abs(acc - np.nan_to_num(conf))[has]
        ax.bar(centers[has], gap, bottom=gap_bottom, width=width * 0.95, color="C3", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {100 * d['ece']:.2f}%")
        ax.legend(loc="upper left", fontsize=8)
        # Sample share per bin, small, so empty and crowded bins are visible.
        twin = ax.twinx()
        share = np.asarray(d["count"], dtype=float) / max(sum(d["count"]), 1)
        twin.plot(centers, share, color="0.4", lw=0.8, marker=".", ms=3)
        twin.set_ylim(0, 1)
        twin.set_ylabel("share of samples", color="0.4", fontsize=8)
        twin.tick_params(labelsize=7, colors="0.4")
    return save_figure(fig, path)


__all__ = ["plot_reliability", "reliability"]
