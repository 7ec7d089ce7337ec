"""Runs of a folder as one table, seeds grouped with mean and standard deviation.

A run folder is any folder holding a complete `result.json` (written by the trainer at the
end of a run) and `config.yaml` (read through `kdlab.engine.run_folder.RunFolder`). Runs named `<name>_seed<k>` (what `kdlab train --seeds N` writes)
are grouped under `<name>`; every group reports n and, for the last-epoch and best-epoch value
of each metric its task reports (`kdlab.engine.result.RunResult`), the mean and the *sample*
standard deviation (n - 1 in the denominator; 0 for a single run). The text table shows the
task's headline metrics (`Task.headline_metrics`), the CSV every metric. Papers report either
the last or the best value, so both are shown. A group whose
runs are not the same experiment up to their seed (`kdlab.schema.compare`) is flagged.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kdlab.schema.compare import run_differences
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import METRICS_FILE, RESULT_FILE, RunFolder
from kdlab.errors import KDLabError
from kdlab.text_table import print_table

SEED_SUFFIX = re.compile(r"^(?P<base>.+)_seed(?P<seed>-?\d+)$")


def seed_run_name(name: str, seed: int) -> str:
    """The run name `kdlab train --seeds` gives seed `seed` of config `name`."""
    return f"{name}_seed{seed}"


def split_seed_name(name: str) -> tuple[str, int | None]:
    """`'kd_x_seed3'` -> `('kd_x', 3)`; a name without the suffix -> `(name, None)`."""
    m = SEED_SUFFIX.match(name)
    return (m.group("base"), int(m.group("seed"))) if m else (name, None)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value; NaN for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


@dataclass
class RunRecord:
    """One finished run: its result.json numbers and what its config.yaml says it trained."""

    run_dir: Path
    name: str
    group: str
    seed: int | None
    method: str
    model: str
    teacher: str
    dataset: str
    epochs: int
    metrics: dict[str, float]
    best_epoch: int
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    #: `last_<m>`/`best_<m>` of the task's headline metrics: the text table's columns.
    headline: tuple[str, ...] = ()


def read_run(run_dir: str | Path) -> RunRecord:
    """A `RunRecord` from `<run_dir>/result.json` and `<run_dir>/config.yaml` (the resolved config
    as written; `same_up_to_seed` reads it as the current schema does when that matters)."""
    folder = RunFolder(run_dir)
    run_dir = folder.path
    result = RunResult.from_json(folder.read_result())
    config: dict[str, Any] = folder.saved_config() or {}
    name = str(config.get("name") or run_dir.name)
    group, seed = split_seed_name(name)
    if seed is None and config.get("train", {}).get("seed") is not None:
        seed = int(config["train"]["seed"])
    teacher = config.get("teacher") or {}
    return RunRecord(
        run_dir=run_dir,
        name=name,
        group=group,
        seed=seed,
        method=str((config.get("method") or {}).get("name", "?")),
        model=str((config.get("model") or {}).get("name", "?")),
        teacher=str(teacher.get("name", "-")) if teacher else "-",
        dataset=str((config.get("data") or {}).get("name", "?")),
        epochs=result.epochs,
        metrics=result.flat_metrics(),
        best_epoch=result.best_epoch,
        config=config,
        headline=tuple(f"{when}_{m}" for m in result.headline for when in ("last", "best")),
    )


def find_runs(folder: str | Path) -> list[RunRecord]:
    """Every finished run (a folder with a complete result.json) under `folder`, itself included."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KDLabError(f"{str(folder)!r} is not a folder; pass the folder holding the run folders (e.g. runs)")
    return [read_run(p.parent) for p in sorted(folder.rglob(RESULT_FILE)) if RunFolder(p.parent).is_finished()]


def unfinished_runs(folder: str | Path) -> list[Path]:
    """Run folders under `folder` that have metrics.jsonl but no complete result.json (still running or stopped)."""
    return sorted(p.parent for p in Path(folder).rglob(METRICS_FILE) if not RunFolder(p.parent).is_finished())


@dataclass
class GroupSummary:
    """Runs of one config over seeds: mean and sample std of each metric."""

    group: str
    runs: list[RunRecord]
    stats: dict[str, tuple[float, float]]
    consistent: bool

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def first(self) -> RunRecord:
        return self.runs[0]


def same_up_to_seed(a: RunRecord, b: RunRecord) -> bool:
    """Whether two runs are the same experiment but for their seed. The saved configs are
    compared as written; only when they differ are they read as the current schema reads them
    (defaults of settings added since filled in, which needs the method registry and so torch),
    so that runs trained before a new setting existed compare fairly."""
    if not run_differences(a.config, b.config, across_seeds=True):
        return True
    full = [RunFolder(r.run_dir).experiment() or {} for r in (a, b)]
    return not run_differences(full[0], full[1], across_seeds=True)


def group_runs(records: Iterable[RunRecord], root: str | Path | None = None) -> list[GroupSummary]:
    """Group runs by name without the `_seed<k>` suffix (and by parent folder relative to
    `root`, so equal names in different sub-folders stay apart)."""
    groups: dict[str, list[RunRecord]] = {}
    for rec in records:
        key = rec.group
        if root is not None:
            parent = rec.run_dir.parent
            try:
                rel = parent.resolve().relative_to(Path(root).resolve())
            except ValueError:
                rel = Path(".")
            if str(rel) not in (".", ""):
                key = f"{rel.as_posix()}/{rec.group}"
        groups.setdefault(key, []).append(rec)
    out = []
    for key, runs in groups.items():
        runs.sort(key=lambda r: (r.seed if r.seed is not None else -1, r.name))
        names = dict.fromkeys(m for r in runs for m in r.metrics)
        stats = {m: mean_std([r.metrics.get(m, math.nan) for r in runs]) for m in names}
        consistent = all(same_up_to_seed(runs[0], r) for r in runs[1:])
        out.append(GroupSummary(key, runs, stats, consistent))
    return sorted(out, key=lambda g: g.group)


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"


TABLE_HEADERS = ["run", "n", "method", "model", "teacher"]


def shown_metrics(groups: Sequence[GroupSummary], *, headline: bool = True) -> tuple[str, ...]:
    """The metric columns (`last_<m>`, `best_<m>`) some group has a value for: the headline
    metrics of the runs' tasks (`headline`, the text table), or every metric (the CSV). A folder
    holding runs of several tasks shows the columns of each."""
    def value(g: GroupSummary, key: str) -> bool:
        return not math.isnan(g.stats.get(key, (math.nan, 0.0))[0])

    order = [k for g in groups for r in g.runs for k in (r.headline if headline else r.metrics)]
    return tuple(k for k in dict.fromkeys(order) if any(value(g, k) for g in groups))


def metric_title(key: str) -> str:
    """`last_bbox_ap` -> "last bbox_ap": the column title of a metric."""
    when, _, name = key.partition("_")
    return f"{when} {name}"


def table_rows(groups: Sequence[GroupSummary]) -> list[list[str]]:
    rows = []
    for g in groups:
        name = g.group if g.consistent else f"{g.group} (configs differ!)"
        rows.append([name, str(g.n), g.first.method, g.first.model, g.first.teacher]
                    + [fmt_mean_std(*g.stats.get(m, (math.nan, 0.0)), g.n) for m in shown_metrics(groups)])
    return rows


def format_text(groups: Sequence[GroupSummary], markdown: bool = False) -> str:
    """An aligned table (valid Markdown either way; `markdown` only changes the ± sign's escaping)."""
    buf = io.StringIO()
    rows = table_rows(groups)
    if markdown:
        rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    print_table(TABLE_HEADERS + [metric_title(m) for m in shown_metrics(groups)], rows, file=buf)
    return buf.getvalue()


def format_csv(groups: Sequence[GroupSummary]) -> str:
    """One CSV line per group with the numbers as numbers (mean and std in separate columns)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["run", "n", "method", "model", "teacher", "dataset", "epochs"]
    metrics = shown_metrics(groups, headline=False)
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std"]
    header += ["seeds", "run_dirs", "consistent"]
    writer.writerow(header)
    for g in groups:
        row: list[Any] = [g.group, g.n, g.first.method, g.first.model, g.first.teacher, g.first.dataset, g.first.epochs]
        for m in metrics:
            mean, std = g.stats.get(m, (math.nan, 0.0))
            row += [f"{mean:.4f}", f"{std:.4f}"]
        row += [" ".join(str(r.seed) for r in g.runs), " ".join(str(r.run_dir) for r in g.runs), g.consistent]
        writer.writerow(row)
    return buf.getvalue()


__all__ = [
    "GroupSummary", "RunRecord", "find_runs", "fmt_mean_std", "format_csv", "format_text", "group_runs", "mean_std",
    "metric_title", "read_run", "same_up_to_seed", "seed_run_name", "shown_metrics", "split_seed_name",
    "unfinished_runs",
]
