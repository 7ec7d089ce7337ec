"""The papers' result tables as data: `rows.yaml`, one row per published number.

`load_rows()` reads and checks the file shipped inside the package; `select_rows(patterns)`
picks rows by exact id or shell-style glob (`dkd/cifar100/*`). Numbers come only from
PAPERS.md; a row whose number PAPERS.md does not give has `published: null`.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from kdlab.errors import ConfigError
from kdlab.registry import closest

ROWS_FILE = Path(__file__).with_name("rows.yaml")

#: Metric name -> what it means. A row's metric is one its run's task reports (`last`/`best` of
#: result.json), optionally `<m>_error` (100 - m), `<m>_gain` (m - the baseline row's m) and
#: `_best_generation` (the best generation of a chain); `kdlab.reproduce.runner.metric_values`.
METRICS = {
    "top1": "top-1 accuracy (%)",
    "top1_gain": "top-1 gain in points over the baseline row (same seeds/recipe)",
    "top1_error": "top-1 error (%) = 100 - top-1",
    "top5_error": "top-5 error (%) = 100 - top-5",
    "top1_best_generation": "top-1 (%) of the best generation of a chain",
    "top1_error_best_generation": "top-1 error (%) of the best generation of a chain",
    "top5_error_best_generation": "top-5 error (%) of the best generation of a chain",
    "bbox_ap": "COCO box AP (%) at IoU .50:.95 (pycocotools COCOeval; task: detection)",
    "segm_ap": "COCO mask AP (%) at IoU .50:.95 (pycocotools COCOeval; task: detection, Mask R-CNN)",
}


@dataclass(frozen=True)
class Row:
    """One published number and the config that reproduces it."""

    id: str
    paper: str
    table: str
    dataset: str
    method: str
    config: str | None
    published: float | None
    metric: str = "top1"
    teacher: str | None = None
    student: str | None = None
    teacher_config: str | None = None
    baseline: str | None = None
    note: str | None = None

    @property
    def pair(self) -> str:
        if self.teacher and self.student:
            return f"{self.teacher} -> {self.student}"
        return self.student or self.teacher or "-"


def _parse(raw: Any, source: Path) -> list[Row]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: must be a YAML list of rows")
    names = {f.name for f in fields(Row)}
    rows = []
    for i, item in enumerate(raw):
        unknown = set(item) - names
        if unknown:
            raise ConfigError(f"{source}: row {i} has unknown keys {sorted(unknown)}; valid: {sorted(names)}")
        row = Row(**item)
        if row.metric not in METRICS:
            raise ConfigError(f"{source}: row {row.id!r} has unknown metric {row.metric!r}; valid: {', '.join(METRICS)}")
        rows.append(row)
    ids = [r.id for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{source}: duplicate row ids {dupes}")
    known = set(ids)
    for r in rows:
        if r.baseline and r.baseline not in known:
            raise ConfigError(f"{source}: row {r.id!r} names baseline {r.baseline!r}, which is not a row")
    return rows


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[Row, ...]:
    p = Path(path)
    return tuple(_parse(yaml.safe_load(p.read_text()), p))


def load_rows(path: str | Path | None = None) -> list[Row]:
    """Every row of the table (the packaged `rows.yaml` unless `path` is given)."""
    return list(_load(str(path or ROWS_FILE)))


def select_rows(patterns: Iterable[str], rows: list[Row] | None = None) -> list[Row]:
    """Rows matching any pattern (exact id or glob), in table order; an unmatched pattern is an error."""
    rows = rows if rows is not None else load_rows()
    patterns = list(patterns)
    chosen: list[Row] = []
    for pat in patterns:
        hits = [r for r in rows if r.id == pat or fnmatch.fnmatchcase(r.id, pat)]
        if not hits:
            hint = closest(pat, [r.id for r in rows])
            raise ConfigError(
                f"no reproduce row matches {pat!r}" + (f"; did you mean {hint!r}?" if hint else "")
                + " List them with 'kdlab reproduce --list' (globs work: 'dkd/cifar100/*')"
            )
        chosen += [h for h in hits if h not in chosen]
    order = {r.id: i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[r.id])


def repo_root(explicit: str | Path | None = None) -> Path:
    """Where the rows' `configs/...` paths are resolved: `explicit`, else the current folder
    when it has `configs/`, else the source checkout that holds this package."""
    if explicit is not None:
        return Path(explicit)
    if Path("configs").is_dir():
        return Path(".")
    return Path(__file__).resolve().parents[2]


__all__ = ["METRICS", "ROWS_FILE", "Row", "load_rows", "repo_root", "select_rows"]
