"""Training curves from the `metrics.jsonl` files the trainer writes (`kdlab plot`).

One figure: a panel of accuracy (val top-1 solid, train top-1 dashed), then one panel per
loss term (`train/<term>`, the already-weighted terms the optimiser saw, plus their sum
`train/loss`), optionally the learning rate and the method diagnostics (`stat/<name>`).
Several runs are overlaid, one colour per run, labelled by run name, e.g. KD against DKD.
A term missing from a run (DKD has `tckd`, KD has `kd`) simply has no line for that run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.lines import Line2D

from kdlab.analysis.plotting import new_figure, save_figure
from kdlab.engine.run_folder import METRICS_FILE
from kdlab.errors import KDLabError


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch rows of `<run_dir>/metrics.jsonl` (or of that file itself), in epoch order."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise KDLabError(f"{str(path)!r} does not exist; pass a run folder written by 'kdlab train' "
                         "(it holds metrics.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise KDLabError(f"{path}:{n} is not valid JSON; the metrics file is damaged") from None
    return sorted(rows, key=lambda r: r.get("epoch", 0))


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders from `paths`: a folder with metrics.jsonl is a run; any other folder
    stands for every run folder below it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS_FILE).is_file() or p.name == METRICS_FILE:
            out.append(p if p.is_dir() else p.parent)
        elif p.is_dir():
            found = sorted(m.parent for m in p.rglob(METRICS_FILE))
            if not found:
                raise KDLabError(f"no run folders (with metrics.jsonl) under {str(p)!r}; pass run folders written by 'kdlab train'")
            out.extend(found)
        else:
            raise KDLabError(f"{str(p)!r} does not exist; pass run folders written by 'kdlab train' "
                             "(folders holding metrics.jsonl)")
    return out


def loss_terms(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every `train/<term>` key over all runs (not train/top1), `train/loss` last."""
    keys: list[str] = []
    for rows in runs.values():
        for row in rows:
            for k in row:
                if k.startswith("train/") and k != "train/top1" and k not in keys:
                    keys.append(k)
    terms = sorted(k for k in keys if k != "train/loss")
    return terms + (["train/loss"] if "train/loss" in keys else [])


def stat_keys(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    return sorted({k for rows in runs.values() for row in rows for k in row if k.startswith("stat/")})


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            xs.append(int(row["epoch"]))
            ys.append(float(v))
    return xs, ys


def metric_keys(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The validation metrics to draw, one panel each: every run's primary metric (the first
    `val/` metric its task logs: top1, bbox_ap, ...) and the other COCO APs with a value
    (segm_ap, the mask AP of instance segmentation), in the order the runs log them."""
    keys: list[str] = []
    for rows in runs.values():
        logged = [k[len("val/"):] for row in rows for k in row if k.startswith("val/") and k != "val/loss"]
        logged = list(dict.fromkeys(logged))
        with_values = [m for m in logged if any(_finite(row.get(f"val/{m}")) for row in rows)]
        keys += logged[:1] + [m for m in with_values if m.endswith("_ap")]
    return list(dict.fromkeys(keys))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_curves(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    stats: bool = False,
    lr: bool = False,
    log_loss: bool = False,
) -> dict[str, Any]:
    """Plot accuracy and each loss term over epochs for one or more runs into `out` (PNG).

    Returns {"path", "runs", "panels"}: the PNG, the run labels and the panel keys."""
    dirs = expand_run_dirs(run_dirs)
    names = list(labels) if labels else [d.name for d in dirs]
    if len(names) != len(dirs):
        raise KDLabError(f"--labels gives {len(names)} names for {len(dirs)} runs; give one per run")
    runs = {name: read_metrics(d) for name, d in zip(names, dirs)}
    if not any(runs.values()):
        raise KDLabError("the runs have no finished epoch yet (empty metrics.jsonl); plot again after one epoch")
    metrics = metric_keys(runs)
    panels: list[str] = metrics + loss_terms(runs)
    if stats:
        panels += stat_keys(runs)
    if lr:
        panels.append("lr")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(nrows, ncols, width=4.6, height=3.4)
    flat = [ax for row in axes for ax in row]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(flat, panels):
        for (name, rows), color in zip(runs.items(), colors):
            if key in metrics:
                x, y = _series(rows, f"val/{key}")
                if x:
                    ax.plot(x, y, color=color, label=f"{name} val", marker="o" if len(x) < 20 else None, ms=3)
                x, y = _series(rows, f"train/{key}")
                if x:
                    ax.plot(x, y, color=color, ls="--", alpha=0.7, label=f"{name} train")
            else:
                x, y = _series(rows, key)
                if x:
                    ax.plot(x, y, color=color, label=name, marker="o" if len(x) < 20 else None, ms=3)
        if key in metrics:
            ax.set_title(f"{key} (%)")
            if ax.has_data():
                ax.legend(fontsize=7)
        else:
            ax.set_title(key)
            if log_loss and key.startswith("train/") and ax.has_data():
                ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if len(runs) > 1 and len(panels) > 1:
        # One legend of run colours for the loss panels (the metric panels have their own).
        handles = [Line2D([], [], color=c, label=n) for n, c in zip(runs, colors)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), fontsize=8)
    fig.suptitle(" vs ".join(runs) if len(runs) <= 4 else f"{len(runs)} runs")
    path = save_figure(fig, out)
    return {"path": str(path), "runs": list(runs), "panels": panels}


__all__ = ["expand_run_dirs", "loss_terms", "plot_curves", "read_metrics", "stat_keys"]
