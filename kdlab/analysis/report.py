"""`kdlab analyze`: a teacher-student report folder (PNGs, report.md, report.html, metrics.json).

`analyze(teacher_ckpt, student_ckpt, out_dir)` evaluates both models on the dataset of the
student's config (any data key can be overridden, e.g. data.root=...) and writes:

- `per_sample_<split>.png` / `.csv`: per-sample TCKD, NCKD, teacher and student p_t, with
  summary statistics (`kdlab.analysis.per_sample`), for the val split and optionally the
  training split (un-augmented images, the labels the student trained on);
- `correlation_diff.png`: |M_S - M_T| / 3 of the class-mean logit matrices, diagonal 0
  (`kdlab.analysis.correlation`, the DKD paper's figure), with max and mean;
- `reliability.png`: reliability diagrams and ECE of teacher and student
  (`kdlab.analysis.calibration`);
- `report.md` and `report.html` (the same content; the HTML embeds nothing, it links the
  PNGs beside it) and `metrics.json` (every number).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from kdlab.analysis.calibration import plot_reliability, reliability
from kdlab.analysis.correlation import (
    DIFF_SCALE,
    class_mean_logits,
    correlation_difference,
    difference_stats,
    plot_correlation_difference,
)
from kdlab.analysis.per_sample import half_split_stats, per_sample_terms, plot_per_sample, summary, write_csv
from kdlab.config import load_config
from kdlab.data import build_datasets
from kdlab.engine.build import eval_loader
from kdlab.engine.checkpoint import Checkpoint, build_model_from_checkpoint
from kdlab.engine.device import resolve_device
from kdlab.errors import CheckpointError, KDLabError


@torch.no_grad()
def model_logits(model: torch.nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) float32 on CPU, targets (N,)) of `model` over `loader`, in loader order."""
    model.eval()
    outs, targets = [], []
    for batch in loader:
        outs.append(model(batch[0].to(device)).float().cpu())
        targets.append(torch.as_tensor(batch[1]).cpu())
    if not outs:
        raise KDLabError("the evaluation set is empty; check data.root and the dataset's val split")
    return torch.cat(outs), torch.cat(targets)


def _limit(dataset: Any, max_samples: int | None) -> Any:
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, list(range(max_samples)))


def _accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    return float(100.0 * (logits.topk(k, 1).indices == targets[:, None]).any(1).double().mean())


# --------------------------------------------------------------------------- rendering
class _Doc:
    """Minimal document model rendered both to Markdown and to HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [[_cell(c) for c in r] for r in rows])))

    def img(self, path: str, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, v in self.blocks:
            if kind == "h":
                out += [f"## {v}", ""]
            elif kind == "p":
                out += [v, ""]
            elif kind == "table":
                headers, rows = v
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{v[1]}]({v[0]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(self.title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;"
               "text-align:right}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
               "code{background:#f4f4f4}</style></head><body>", f"<h1>{esc(self.title)}</h1>"]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h2>{esc(v)}</h2>")
            elif kind == "p":
                text = esc(v)
                # `code` spans of the Markdown become <code>.
                parts = text.split("`")
                text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
                out.append(f"<p>{text}</p>")
            elif kind == "table":
                headers, rows = v
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f"<p><img src='{esc(v[0])}' alt='{esc(v[1])}'></p>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _cell(c: Any) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "-"
        return f"{c:.4g}" if abs(c) < 0.01 and c != 0 else f"{c:.4f}" if abs(c) < 10 else f"{c:.2f}"
    return str(c)


# --------------------------------------------------------------------------- analysis
def _load(path: str | Path) -> tuple[torch.nn.Module, Any]:  # (model, Checkpoint)
    ckpt = Checkpoint.load(path)
    task = (ckpt.config or {}).get("task", "classification")
    if task != "classification":
        # Every part of the report reads per-class logits; a detector has none to compare.
        raise KDLabError(f"kdlab analyze compares classifiers (per-sample TCKD/NCKD, class correlations, "
                         f"calibration of class probabilities); {str(path)!r} is a {task} checkpoint. Evaluate "
                         f"it with 'kdlab eval {path}' or plot its runs with 'kdlab plot'")
    return build_model_from_checkpoint(path)


def analyze(
    teacher_ckpt: str | Path,
    student_ckpt: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    splits: Sequence[str] = ("val",),
    temperature: float | None = None,
    bins: int = 15,
    device: str = "auto",
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Write the report folder; return the numbers (also in `metrics.json`)."""
    for s in splits:
        if s not in ("val", "train"):
            raise KDLabError(f"unknown split {s!r}; use val and/or train")
    teacher, t_ckpt = _load(teacher_ckpt)
    student, s_ckpt = _load(student_ckpt)
    if not s_ckpt.config:
        raise CheckpointError(f"the student checkpoint {str(student_ckpt)!r} records no config (dataset, method); "
                              "analyse a checkpoint written by 'kdlab train'")
    cfg = load_config(data=s_ckpt.config, overrides=overrides)
    # Analysis sees every image as evaluated: no augmentation, also for the training split.
    data_cfg = cfg.data.model_copy(update={"augment": "none"})
    data = build_datasets(data_cfg)
    for role, ck, path in (("teacher", t_ckpt, teacher_ckpt), ("student", s_ckpt, student_ckpt)):
        classes = ck.model.num_classes
        if classes != data.num_classes:
            raise CheckpointError(
                f"the {role} checkpoint {str(path)!r} has {classes} classes but dataset {data_cfg.name!r} has "
                f"{data.num_classes}; analyse a teacher and a student trained on the same dataset"
            )
    if temperature is None:
        temperature = float(getattr(cfg.method, "temperature", 4.0))
    dev = resolve_device(device)
    teacher.to(dev)
    student.to(dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_name = f"teacher {t_ckpt.model.name}"
    s_name = f"student {s_ckpt.model.name} ({s_ckpt.method})"

    metrics: dict[str, Any] = {
        "teacher": {"checkpoint": str(teacher_ckpt), "model": t_ckpt.model.name, "epoch": t_ckpt.epoch},
        "student": {"checkpoint": str(student_ckpt), "model": s_ckpt.model.name,
                    "method": s_ckpt.method, "epoch": s_ckpt.epoch},
        "dataset": data_cfg.name, "temperature": temperature, "splits": {},
    }
    doc = _Doc(f"kdlab analysis: {s_name} vs {t_name}")
    doc.p(f"Teacher `{teacher_ckpt}`, student `{student_ckpt}`; dataset `{data_cfg.name}`; per-sample "
          f"TCKD/NCKD at T = {temperature:g} (T²-scaled, as trained), confidences at T = 1.")
    for split in splits:
        dataset = _limit(data.val if split == "val" else data.train, max_samples)
        loader = eval_loader(dataset, data_cfg, dev.type)
        t_logits, targets = model_logits(teacher, loader, dev)
        s_logits, _ = model_logits(student, loader, dev)
        terms = per_sample_terms(s_logits, t_logits, targets, temperature)
        split_metrics: dict[str, Any] = {
            "samples": int(targets.numel()),
            "teacher_top1": _accuracy(t_logits, targets), "student_top1": _accuracy(s_logits, targets),
            "teacher_top5": _accuracy(t_logits, targets, 5), "student_top5": _accuracy(s_logits, targets, 5),
            "agreement": float(100.0 * (t_logits.argmax(1) == s_logits.argmax(1)).double().mean()),
            "summary": {k: summary(terms[k]) for k in ("tckd", "nckd", "kd", "teacher_pt", "student_pt")},
            "halves_by_teacher_pt": half_split_stats(terms),
        }
        png = plot_per_sample(terms, out / f"per_sample_{split}.png", title=f"{s_name} vs {t_name}, {split}")
        write_csv(terms, out / f"per_sample_{split}.csv")
        doc.h(f"{split} split: {split_metrics['samples']} samples")
        doc.table(["model", "top-1", "top-5"], [
            [t_name, split_metrics["teacher_top1"], split_metrics["teacher_top5"]],
            [s_name, split_metrics["student_top1"], split_metrics["student_top5"]],
        ])
        doc.p(f"Teacher and student predict the same class on {split_metrics['agreement']:.2f}% of the samples."
              + (" Training images are shown un-augmented, with the labels the student trained on "
                 "(noisy ones if the run used label noise)." if split == "train" else ""))
        doc.table(["quantity", "mean", "std", "min", "p05", "median", "p95", "max"], [
            [k] + [split_metrics["summary"][k][s] for s in ("mean", "std", "min", "p05", "median", "p95", "max")]
            for k in ("tckd", "nckd", "kd", "teacher_pt", "student_pt")
        ])
        halves = split_metrics["halves_by_teacher_pt"]
        if halves:
            doc.p("The samples split at the median teacher confidence (DKD Table 5's ranking):")
            doc.table(["half", "samples", "teacher p_t", "TCKD", "NCKD", "teacher top-1", "student top-1"], [
                [name, h["samples"], h["teacher_pt_mean"], h["tckd_mean"], h["nckd_mean"], h["teacher_top1"],
                 h["student_top1"]] for name, h in halves.items()
            ])
        doc.img(png.name, f"per-sample terms, {split}")
        doc.p(f"Per-sample values: `per_sample_{split}.csv`.")
        if split == "val":
            c = data.num_classes
            m_t = class_mean_logits(t_logits.numpy(), targets.numpy(), c)
            m_s = class_mean_logits(s_logits.numpy(), targets.numpy(), c)
            diff = correlation_difference(m_t, m_s)
            corr = difference_stats(diff)
            np.save(out / "correlation_diff.npy", diff)
            png = plot_correlation_difference(diff, out / "correlation_diff.png", f"{s_name} vs {t_name}",
                                              list(data.class_names))
            split_metrics["correlation_diff"] = corr
            doc.h("Class-correlation difference (DKD's figure)")
            doc.p(f"Per class, the mean logit vector over the {split} images of that class gives a C x C matrix "
                  f"per model; the heatmap is |M_student - M_teacher| / {DIFF_SCALE:g} with the diagonal set to 0, "
                  "on 0..1. Smaller is closer to the teacher (DKD authors, ResNet32x4 -> ResNet8x4: KD 0.899/0.090, "
                  "DKD 0.416/0.044 max/mean).")
            doc.table(["max", "mean (all entries)", "mean (off-diagonal)", "classes"],
                      [[corr["max"], corr["mean"], corr["mean_offdiag"], corr["classes"]]])
            doc.img(png.name, "class-correlation difference")
            rel = {}
            for name, logits in ((t_name, t_logits), (s_name, s_logits)):
                rel[name] = reliability(logits, targets, bins)
            png = plot_reliability(rel, out / "reliability.png")
            split_metrics["calibration"] = {
                "teacher": {k: rel[t_name][k] for k in ("ece", "mce", "mean_confidence", "accuracy_overall")},
                "student": {k: rel[s_name][k] for k in ("ece", "mce", "mean_confidence", "accuracy_overall")},
                "bins": bins,
            }
            doc.h("Calibration")
            doc.p(f"Max-softmax confidence in {bins} equal-width bins; ECE = sum over bins of "
                  "(bin share) x |accuracy - confidence|; MCE = the largest bin gap.")
            doc.table(["model", "ECE (%)", "MCE (%)", "mean confidence (%)", "accuracy (%)"], [
                [name, 100 * r["ece"], 100 * r["mce"], 100 * r["mean_confidence"], 100 * r["accuracy_overall"]]
                for name, r in rel.items()
            ])
            doc.img(png.name, "reliability diagrams")
        metrics["splits"][split] = split_metrics
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    doc.p("All numbers: `metrics.json`.")
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html())
    metrics["report"] = str(out / "report.md")
    return metrics


__all__ = ["analyze", "model_logits"]
