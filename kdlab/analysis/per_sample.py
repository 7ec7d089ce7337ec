"""Per-sample DKD quantities of a teacher-student pair, their statistics and histograms.

For every sample: TCKD and NCKD between teacher and student at temperature T (T^2-scaled,
exactly the per-sample terms `kdlab.losses.dkd_terms` trains with), the teacher's target
confidence p_t^T (softmax at T = 1, the quantity DKD Table 5 ranks by, and at T), the
student's p_t, and whether each model is right. The scatter of NCKD against p_t^T shows what
classic KD does with it: KD weights NCKD by 1 - p_t^T, so it suppresses NCKD exactly on the
samples the teacher is sure of (DKD Eq. 7).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.analysis.plotting import new_figure, save_figure
from kdlab.losses import dkd_terms

COLUMNS = ("index", "target", "teacher_pred", "student_pred", "teacher_pt", "student_pt",
           "teacher_pt_T", "tckd", "nckd", "kd")


def per_sample_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                     temperature: float = 4.0) -> dict[str, np.ndarray]:
    """Columns `COLUMNS` as numpy arrays (one entry per sample)."""
    s, t, y = student_logits.float(), teacher_logits.float(), targets.long()
    with torch.no_grad():
        parts = dkd_terms(s, t, y, temperature)
        t_pt = t.softmax(1).gather(1, y[:, None]).squeeze(1)
        s_pt = s.softmax(1).gather(1, y[:, None]).squeeze(1)
        kd = parts.tckd + parts.teacher_non_target_prob * parts.nckd  # = T^2 KL(p^T || p^S), Eq. 7
    return {
        "index": np.arange(len(y)),
        "target": y.numpy(),
        "teacher_pred": t.argmax(1).numpy(),
        "student_pred": s.argmax(1).numpy(),
        "teacher_pt": t_pt.numpy(),
        "student_pt": s_pt.numpy(),
        "teacher_pt_T": parts.teacher_target_prob.numpy(),
        "tckd": parts.tckd.numpy(),
        "nckd": parts.nckd.numpy(),
        "kd": kd.numpy(),
    }


def summary(values: Any) -> dict[str, float]:
    """mean, std, min, 5/25/50/75/95th percentiles, max of a 1-D array."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {k: float("nan") for k in ("mean", "std", "min", "p05", "p25", "median", "p75", "p95", "max")}
    q = np.percentile(v, [5, 25, 50, 75, 95])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "p05": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4]), "max": float(v.max())}


def half_split_stats(terms: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean TCKD/NCKD and accuracies on the top and bottom halves by teacher p_t (Table 5's split)."""
    order = np.argsort(-terms["teacher_pt"], kind="stable")
    k = len(order) // 2
    out = {}
    for name, idx in (("top_half", order[:k]), ("bottom_half", order[k:])):
        if idx.size == 0:
            continue
        out[name] = {
            "samples": int(idx.size),
            "teacher_pt_mean": float(terms["teacher_pt"][idx].mean()),
            "tckd_mean": float(terms["tckd"][idx].mean()),
            "nckd_mean": float(terms["nckd"][idx].mean()),
            "teacher_top1": float(100 * (terms["teacher_pred"][idx] == terms["target"][idx]).mean()),
            "student_top1": float(100 * (terms["student_pred"][idx] == terms["target"][idx]).mean()),
        }
    return out


def plot_per_sample(terms: dict[str, np.ndarray], path: str | Path, title: str = "", bins: int = 50) -> Path:
    """Histograms of TCKD, NCKD and target confidences, and the NCKD-vs-p_t^T scatter."""
    fig, axes = new_figure(2, 2, width=4.6, height=3.4)
    (a, b), (c, d) = axes
    for ax, key, color in ((a, "tckd", "C0"), (b, "nckd", "C1")):
        v = terms[key]
        ax.hist(v, bins=bins, color=color, alpha=0.8)
        ax.axvline(float(np.mean(v)), color="k", ls="--", lw=1, label=f"mean {np.mean(v):.3g}")
        ax.set_title(f"per-sample {key.upper()} (x T²)")
        ax.set_xlabel(key)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    edges = np.linspace(0, 1, bins + 1)
    c.hist(terms["teacher_pt"], bins=edges, alpha=0.6, color="C2", label="teacher")
    c.hist(terms["student_pt"], bins=edges, alpha=0.6, color="C4", label="student")
    c.set_title("target-class confidence p_t (T = 1)")
    c.set_xlabel("p_t")
    c.set_ylabel("samples")
    c.legend(fontsize=8)
    d.scatter(terms["teacher_pt"], terms["nckd"], s=3, alpha=0.35, color="C1", label="NCKD")
    d.scatter(terms["teacher_pt"], (1 - terms["teacher_pt_T"]) * terms["nckd"], s=3, alpha=0.35, color="C7",
              label="(1 - p_t^T) NCKD, as in KD")
    d.set_xlabel("teacher p_t (T = 1)")
    d.set_ylabel("per-sample term")
    d.set_title("NCKD vs teacher confidence")
    d.legend(fontsize=7, markerscale=3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def write_csv(terms: dict[str, np.ndarray], path: str | Path) -> Path:
    """One row per sample, columns `COLUMNS`."""
    path = Path(path)
    cols = [terms[k] for k in COLUMNS]
    with path.open("w") as f:
        f.write(",".join(COLUMNS) + "\n")
        for row in zip(*cols):
            f.write(",".join(f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(int(v)) for v in row) + "\n")
    return path


__all__ = ["COLUMNS", "half_split_stats", "per_sample_terms", "plot_per_sample", "summary", "write_csv"]
