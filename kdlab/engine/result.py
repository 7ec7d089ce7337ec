"""What a finished run reports: `RunResult`, written to `<run_dir>/result.json`.

The metrics are the task's own (`Task.reported_metrics`: top1/top5 for classification, COCO AP
for detection), as two dicts: `last` (the last evaluated epoch) and `best` (the epoch with the
best `primary_metric`). Nothing here names a metric, so a registered task reports what it
measures without a change here.

Reading accepts the older layout too: result.json files written before the metrics became
dicts hold flat `last_top1`, `best_top1`, `last_top5`, `best_top5` keys, and runs on disk keep
them. `RunResult.from_json` reads both; `flat_metrics` gives the flat `last_<m>`/`best_<m>`
view the tables print.

This module imports no torch: `kdlab results` reads run folders without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

def _number(value: Any) -> float:
    """A metric read from JSON: `null` (an undefined metric, e.g. AP with no detections) is NaN."""
    return math.nan if value is None else float(value)


@dataclass
class RunResult:
    """Summary of a finished run (also written to `<run_dir>/result.json`).

    `last` and `best` hold the task's reported metrics of the last evaluated epoch and of the
    best epoch (`best_epoch`, chosen by `primary_metric`); papers report either. `headline`
    names the metrics a table shows (`Task.headline_metrics`); all of them are in the dicts."""

    run_dir: str
    epochs: int
    best_epoch: int
    primary_metric: str = "top1"
    headline: tuple[str, ...] = ()
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    skipped_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result.json content. An undefined metric (NaN) is `null`: JSON has no NaN."""
        def clean(metrics: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}

        return {"run_dir": self.run_dir, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "skipped_batches": self.skipped_batches, "primary_metric": self.primary_metric,
                "headline": list(self.headline), "last": clean(self.last), "best": clean(self.best)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunResult":
        """A result read from result.json, in the current layout or the older flat one
        (`last_top1`, `best_top1`, ...: classification runs written before the dicts)."""
        last, best = data.get("last"), data.get("best")
        if not isinstance(last, Mapping):
            last = {k[len("last_"):]: v for k, v in data.items() if k.startswith("last_")}
        if not isinstance(best, Mapping):
            best = {k[len("best_"):]: v for k, v in data.items() if k.startswith("best_") and k != "best_epoch"}
        # Files without a headline (written before it existed) hold top1/top5 or bbox_ap/bbox_ap50 first.
        headline = data.get("headline") or list(last)[:2]
        return cls(run_dir=str(data.get("run_dir", "")), epochs=int(data["epochs"]), best_epoch=int(data["best_epoch"]),
                   primary_metric=str(data.get("primary_metric") or "top1"), headline=tuple(headline),
                   last={k: _number(v) for k, v in last.items()}, best={k: _number(v) for k, v in best.items()},
                   skipped_batches=int(data.get("skipped_batches", 0)))

    def flat_metrics(self) -> dict[str, float]:
        """`last_<metric>` and `best_<metric>` for every metric (the columns of the tables),
        metric by metric: last_top1, best_top1, last_top5, ..."""
        names = list(dict.fromkeys([*self.last, *self.best]))
        return {f"{when}_{m}": getattr(self, when).get(m, math.nan) for m in names for when in ("last", "best")}

    def summary(self) -> str:
        """One line in the task's own metric: "last top1 71.20  best top1 71.55 (epoch 238)",
        or bbox_ap for detection."""
        m = self.primary_metric
        return (f"last {m} {self.last.get(m, math.nan):.2f}  best {m} {self.best.get(m, math.nan):.2f} "
                f"(epoch {self.best_epoch})")


def flat_metrics(result_json: Mapping[str, Any]) -> dict[str, float]:
    """`RunResult.from_json(result_json).flat_metrics()`: `last_top1`, `best_bbox_ap`, ..."""
    return RunResult.from_json(result_json).flat_metrics()


__all__ = ["RunResult", "flat_metrics"]
