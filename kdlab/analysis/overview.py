"""One figure that compares many runs at a glance (`kdlab demo`).

Left: one or more panels of validation top-1 per epoch, each a group of runs (for example
"one teacher, several methods" and "generations"); right: a horizontal bar chart of each
run's last-epoch top-1 with a dashed line at a reference run (the student alone).
Curves come from the rows the trainer writes to `metrics.jsonl` (`kdlab.analysis.curves`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.ticker import MaxNLocator

from kdlab.analysis.curves import _series
from kdlab.analysis.plotting import new_figure, save_figure


@dataclass
class Curve:
    """One run in a panel: its label, epoch rows and line style."""

    label: str
    rows: list[dict[str, Any]]
    color: str
    style: str = "-"
    width: float = 1.6


@dataclass
class Panel:
    title: str
    curves: list[Curve] = field(default_factory=list)


def _floor_to(value: float, step: float) -> float:
    return step * math.floor(value / step)


def plot_overview(panels: Sequence[Panel], bars: Sequence[tuple[str, float, str]], out: str | Path, *,
                  reference: tuple[str, float] | None = None, title: str | None = None,
                  bar_title: str = "last-epoch top-1 (%)") -> Path:
    """Draw the curve panels and the bar chart (label, value, colour) side by side into `out` (PNG).

    The accuracy axes start 10 points below the lowest bar (rounded to 5), so that the
    differences between the final accuracies stay visible instead of the first epochs' climb."""
    values = [v for _, v, _ in bars if math.isfinite(v)]
    low = max(0.0, _floor_to(min(values) - 10.0, 5.0)) if values else 0.0
    fig, axes = new_figure(1, len(panels) + 1, width=4.8, height=4.4)
    for ax, panel in zip(axes[0], panels):
        for curve in panel.curves:
            x, y = _series(curve.rows, "val/top1")
            if x:
                ax.plot(x, y, color=curve.color, ls=curve.style, label=curve.label, lw=curve.width,
                        marker="o" if len(x) < 8 else None, ms=3)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation top-1 (%)")
        ax.set_ylim(low, 100.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    ax = axes[0][-1]
    labels = [label for label, _, _ in bars]
    ys = list(range(len(bars)))[::-1]  # first bar on top
    ax.barh(ys, [v for _, v, _ in bars], color=[c for _, _, c in bars], height=0.7)
    for y, (_, v, _) in zip(ys, bars):
        ax.text(v + 0.3, y, f"{v:.2f}", va="center", fontsize=7.5)
    ax.set_yticks(ys, labels, fontsize=7.5)
    ax.set_xlim(low, 101.5)
    if reference is not None:
        ax.axvline(reference[1], color="k", ls="--", lw=1, label=reference[0])
        ax.legend(fontsize=7.5, loc="lower right")
    ax.set_title(bar_title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, out)


__all__ = ["Curve", "Panel", "plot_overview"]
