"""A sweep's results: sweep.json, sweep.md and sweep.png in `<output_dir>/<sweep name>/`.

Per point: the finished runs (one per seed), n, and for every metric the task reports
(`RunResult.last`/`best`) the mean and the *sample* standard deviation over the seeds
(`kdlab.experiments.results.mean_std`: n - 1; 0 for one run). A point with a run that
failed or did not finish says so (`missing`); its numbers are those of the runs that did.

The figure shows the sweep's metric (`sweep.metric`, default the task's primary one, last
epoch): one varied key -> mean against the value with ± std error bars (numbers on a numeric
axis, anything else as categories); two keys -> a heatmap of the mean with the numbers in the
cells; more keys -> one panel per key, the mean over the points with that value (bars: the
std of those point means).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdlab.engine.result import RunResult
from kdlab.experiments.results import fmt_mean_std, mean_std
from kdlab.plan import PlanReport
from kdlab.sweep.config import format_value, key_titles
from kdlab.sweep.plan import SweepPlan, collect
from kdlab.text_table import print_table

JSON_FILE, MARKDOWN_FILE, FIGURE_FILE = "sweep.json", "sweep.md", "sweep.png"


@dataclass
class PointRuns:
    """The runs of one point: the finished ones (`runs`, `results`) and the others with their
    status (`missing`: run name -> failed / skipped / not finished / ...)."""

    label: str
    values: dict[str, Any]
    runs: list[str] = field(default_factory=list)
    results: list[RunResult] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def _stats(results: Sequence[RunResult], when: str) -> dict[str, dict[str, float | None]]:
    names = list(dict.fromkeys(m for r in results for m in getattr(r, when)))
    out = {}
    for m in names:
        mean, std = mean_std([getattr(r, when).get(m, math.nan) for r in results])
        out[m] = {"mean": _json_number(mean), "std": _json_number(std)}
    return out


def _json_number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def sweep_data(name: str, base: str, keys: Sequence[str], points: Sequence[PointRuns], metric: str | None = None,
               *, teacher: str | None = None, seeds: int | None = None) -> dict[str, Any]:
    """The content of sweep.json. `metric`: the figure's metric (default: the primary metric
    the runs' results name)."""
    if metric is None:
        metric = next((r.primary_metric for p in points for r in p.results), None)
    rows = []
    for p in points:
        rows.append({"label": p.label, "values": dict(p.values), "runs": list(p.runs), "n": len(p.results),
                     "last": _stats(p.results, "last"), "best": _stats(p.results, "best"),
                     "missing": dict(p.missing)})
    return {"sweep": name, "base": base, "teacher": teacher, "seeds": seeds, "keys": list(keys), "metric": metric,
            "points": rows}


def metric_names(data: dict[str, Any]) -> list[str]:
    """Every metric some point has a last-epoch value for, in the order the runs report them."""
    return list(dict.fromkeys(m for p in data["points"] for m in p["last"]))


def _cell(stats: dict[str, Any], metric: str, n: int) -> str:
    s = stats.get(metric)
    if not s or s["mean"] is None:
        return "-"
    return fmt_mean_std(s["mean"], s["std"] if s["std"] is not None else math.nan, n)


def markdown(data: dict[str, Any]) -> str:
    """sweep.md: what was swept, and one table row per point (± is the sample std over seeds)."""
    keys, metric = data["keys"], data["metric"]
    titles = key_titles(keys)
    metrics = metric_names(data)
    headers = ["point", *(titles[k] for k in keys), "n",
               *(f"last {m}" for m in metrics), *([f"best {metric}"] if metric in metrics else []), "note"]
    rows = []
    for p in data["points"]:
        note = ", ".join(f"{run}: {status}" for run, status in p["missing"].items())
        rows.append([p["label"], *(format_value(p["values"][k]) for k in keys), str(p["n"]),
                     *(_cell(p["last"], m, p["n"]) for m in metrics),
                     *([_cell(p["best"], metric, p["n"])] if metric in metrics else []), note or "-"])
    table = io.StringIO()
    print_table(headers, [[c.replace("|", "\\|") for c in r] for r in rows], file=table)
    head = [f"# Sweep {data['sweep']}", "", f"- base: `{data['base']}`"]
    if data.get("teacher"):
        head.append(f"- teacher: `{data['teacher']}`")
    if data.get("seeds"):
        head.append(f"- seeds per point: {data['seeds']}")
    head.append(f"- cells: mean ± sample std over the finished seeds (n); last = final epoch, best = best epoch; "
                f"figure metric: {metric or '-'}")
    incomplete = sum(1 for p in data["points"] if p["missing"])
    if incomplete:
        head.append(f"- {incomplete} point(s) incomplete: see the note column (their numbers are over the runs "
                    "that finished)")
    return "\n".join(head) + "\n\n" + table.getvalue()


def table_text(data: dict[str, Any]) -> str:
    """The table of sweep.md alone (what the command prints)."""
    text = markdown(data)
    return text[text.index("\n|") + 1:] if "\n|" in text else text


# ---------------------------------------------------------------------------------- figure
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis_values(data: dict[str, Any], key: str) -> list[Any]:
    seen: dict[str, Any] = {}
    for p in data["points"]:
        seen.setdefault(json.dumps(p["values"][key], sort_keys=True), p["values"][key])
    values = list(seen.values())
    return sorted(values) if all(_is_number(v) for v in values) else values


def _mean_std(p: dict[str, Any], metric: str) -> tuple[float, float]:
    s = p["last"].get(metric) or {}
    mean, std = s.get("mean"), s.get("std")
    return (math.nan if mean is None else mean), (0.0 if std is None else std)


def _errorbar(ax: Any, xs: list[Any], means: list[float], stds: list[float], key: str, metric: str) -> None:
    numeric = all(_is_number(x) for x in xs)
    pos = [float(x) for x in xs] if numeric else list(range(len(xs)))
    ax.errorbar(pos, means, yerr=stds, marker="o", capsize=4)
    if not numeric:
        ax.set_xticks(pos, [format_value(x) for x in xs])
    elif len(pos) > 2 and min(pos) > 0 and max(pos) / min(pos) >= 100:
        ax.set_xscale("log")  # learning rates, weight decays: values a decade apart
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (last epoch)")
    ax.grid(alpha=0.3)


def plot(data: dict[str, Any], path: str | Path) -> Path | None:
    """Draw sweep.png (see the module); None when no point has a value of the metric."""
    metric, keys = data["metric"], data["keys"]
    points = [p for p in data["points"] if metric and not math.isnan(_mean_std(p, metric)[0])]
    if not points:
        return None
    from kdlab.analysis.plotting import new_figure, save_figure  # lazy: matplotlib only when a figure is drawn

    title = f"{data['sweep']}: {metric}, mean ± std over seeds"
    if len(keys) == 1:
        xs = [x for x in _axis_values(data, keys[0]) if any(p["values"][keys[0]] == x for p in points)]
        stats = [_mean_std(next(p for p in points if p["values"][keys[0]] == x), metric) for x in xs]
        fig, axes = new_figure()
        _errorbar(axes[0][0], xs, [s[0] for s in stats], [s[1] for s in stats], keys[0], metric)
    elif len(keys) == 2:
        fig, axes = new_figure(width=1.6 + 1.1 * len(_axis_values(data, keys[1])),
                               height=1.4 + 0.8 * len(_axis_values(data, keys[0])))
        _heatmap(fig, axes[0][0], data, points, metric)
    else:
        fig, axes = new_figure(1, len(keys))
        for ax, key in zip(axes[0], keys):
            xs = _axis_values(data, key)
            groups = [[_mean_std(p, metric)[0] for p in points if p["values"][key] == x] for x in xs]
            kept = [(x, mean_std(g)) for x, g in zip(xs, groups) if g]
            _errorbar(ax, [x for x, _ in kept], [s[0] for _, s in kept], [s[1] for _, s in kept], key, metric)
        title = f"{data['sweep']}: {metric}, mean over the other keys (bars: std of the point means)"
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def heatmap_grid(data: dict[str, Any], points: Sequence[dict[str, Any]], metric: str):
    """(row values, column values, matrix of means: NaN where no point) for two keys."""
    k0, k1 = data["keys"]
    rows, cols = _axis_values(data, k0), _axis_values(data, k1)
    grid = [[math.nan] * len(cols) for _ in rows]
    for p in points:
        i = next(i for i, v in enumerate(rows) if v == p["values"][k0])
        j = next(j for j, v in enumerate(cols) if v == p["values"][k1])
        grid[i][j] = _mean_std(p, metric)[0]
    return rows, cols, grid


def _heatmap(fig: Any, ax: Any, data: dict[str, Any], points: Sequence[dict[str, Any]], metric: str) -> None:
    rows, cols, grid = heatmap_grid(data, points, metric)
    values = np.ma.masked_invalid(np.array(grid, dtype=float))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"{metric} (last epoch)")
    ax.set_xticks(range(len(cols)), [format_value(c) for c in cols])
    ax.set_yticks(range(len(rows)), [format_value(r) for r in rows])
    ax.set_xlabel(data["keys"][1])
    ax.set_ylabel(data["keys"][0])
    finite = values.compressed()
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if grid[i][j] > middle else "white")


def summarize(sp: SweepPlan, report: PlanReport | None = None) -> dict[str, Any]:
    """sweep.json's content for a `kdlab.sweep.plan.SweepPlan`, from what its run folders hold
    now (`report`: the plan's outcomes, which mark the runs that failed)."""
    sweep = sp.sweep
    metric = sweep.settings.metric
    points = {p.label: PointRuns(p.label, dict(p.values)) for p in sweep.points}
    for o in collect(sp, report, metric):
        pr = points[o.run.point.label]
        if o.result is not None:
            pr.runs.append(str(o.run.run_dir) + ("" if o.generation is None else f"/gen{o.generation}"))
            pr.results.append(o.result)
        if o.result is None or o.status not in ("done", "reused", "finished"):
            pr.missing[o.run.name] = o.status
    teacher = os.path.normpath(sweep.teacher) if sweep.teacher is not None else None
    return sweep_data(sweep.name, os.path.normpath(sweep.base), sweep.keys, list(points.values()), metric,
                      teacher=teacher, seeds=sweep.seeds)


def write_summary(folder: str | Path, data: dict[str, Any]) -> list[Path]:
    """Write sweep.json, sweep.md and (when a point has the metric) sweep.png into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / JSON_FILE, folder / MARKDOWN_FILE]
    written[0].write_text(json.dumps(data, indent=2) + "\n")
    written[1].write_text(markdown(data))
    figure = plot(data, folder / FIGURE_FILE)
    if figure is not None:
        written.append(figure)
    elif (folder / FIGURE_FILE).is_file():
        (folder / FIGURE_FILE).unlink()  # an earlier figure would show results no longer summarised
    return written


__all__ = ["FIGURE_FILE", "JSON_FILE", "MARKDOWN_FILE", "PointRuns", "heatmap_grid", "markdown", "metric_names",
           "plot", "summarize", "sweep_data", "table_text", "write_summary"]
