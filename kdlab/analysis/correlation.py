"""Teacher-student agreement of class correlations (the DKD paper's visualisation).

For each class c, the mean raw logit vector over the evaluation images of class c gives row
c of a C x C matrix M (one per model). The figure is

    D = |M_student - M_teacher| / 3.0,   diagonal set to 0,   shown on the range 0..1,

and the numbers quoted with it are max(D) and mean(D). mean(D) is over all C x C entries
with the zeroed diagonal included (`mean`), as the figure's matrix is; `mean_offdiag`
averages the C(C-1) off-diagonal entries only. For ResNet32x4 -> ResNet8x4 the DKD authors'
notebook records max/mean 0.899/0.090 for KD and 0.416/0.044 for DKD (PAPERS.md). Smaller is
closer to the teacher. Classes with no evaluation image have no row; they are left out of
the statistics (their row and column are NaN in M and 0 in the figure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdlab.analysis.plotting import new_figure, save_figure

#: The DKD notebook's normaliser of the logit difference.
DIFF_SCALE = 3.0


def class_mean_logits(logits: Any, targets: Any, num_classes: int) -> np.ndarray:
    """(C, C): row c is the mean logit vector over the samples of class c (NaN if none)."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] != num_classes or t.shape != (z.shape[0],):
        raise ValueError(f"logits must be (N, {num_classes}) and targets (N,), got {z.shape} and {t.shape}")
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, t, z)
    counts = np.bincount(t, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def correlation_difference(teacher_m: np.ndarray, student_m: np.ndarray, scale: float = DIFF_SCALE) -> np.ndarray:
    """|M_student - M_teacher| / scale with the diagonal set to 0 (NaN rows of absent classes kept)."""
    d = np.abs(np.asarray(student_m, dtype=np.float64) - np.asarray(teacher_m, dtype=np.float64)) / scale
    np.fill_diagonal(d, 0.0)
    return d


def difference_stats(diff: np.ndarray) -> dict[str, float]:
    """max, mean (all entries, diagonal included as 0) and mean off the diagonal, over the
    classes present in the evaluation set."""
    present = ~np.isnan(diff).all(axis=1)
    sub = diff[np.ix_(present, present)]
    c = sub.shape[0]
    off = sub[~np.eye(c, dtype=bool)] if c > 1 else np.zeros(0)
    return {
        "max": float(np.nanmax(sub)) if sub.size else float("nan"),
        "mean": float(np.nanmean(sub)) if sub.size else float("nan"),
        "mean_offdiag": float(np.nanmean(off)) if off.size else float("nan"),
        "classes": int(c),
    }


def plot_correlation_difference(diff: np.ndarray, path: str | Path, title: str = "",
                                class_names: list[str] | None = None) -> Path:
    """Heatmap of the difference matrix on the fixed range 0..1 (values above 1 saturate)."""
    c = diff.shape[0]
    fig, axes = new_figure(1, 1, width=6.0, height=5.2)
    ax = axes[0][0]
    im = ax.imshow(np.nan_to_num(diff), vmin=0.0, vmax=1.0, cmap="PuBuGn", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("class (logit)")
    ax.set_ylabel("true class")
    if class_names is not None and c <= 20:
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), class_names, fontsize=7)
    stats = difference_stats(diff)
    ax.set_title((title + "\n" if title else "") + f"|M_S - M_T| / {DIFF_SCALE:g}: max {stats['max']:.3f}, "
                 f"mean {stats['mean']:.3f}", fontsize=9)
    return save_figure(fig, path)


__all__ = ["DIFF_SCALE", "class_mean_logits", "correlation_difference", "difference_stats",
           "plot_correlation_difference"]
