"""Matplotlib without a display or global state.

Figures are `matplotlib.figure.Figure` objects drawn by the Agg canvas directly (never
`pyplot`), so plotting works on a headless machine, never opens a window, never leaks
figures between calls and never changes the backend of a user's own session.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 4.0, **kwargs: Any):
    """(figure, axes) with an Agg canvas; axes as from `Figure.subplots(squeeze=False)`."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as PNG to `path` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


__all__ = ["new_figure", "save_figure"]
