"""A plain aligned text table, printed by commands and by the experiment and analysis summaries.

It lives at the bottom of the package so that `analysis/` and `experiments/` can print tables
without importing `commands/` (the layer above them).
"""
from __future__ import annotations

import sys
from typing import Any, TextIO


def print_table(headers: list[str], rows: list[list[Any]], file: TextIO | None = None) -> None:
    """A Markdown-style table: readable in logs and pasteable into Markdown. Floats get 2 decimals."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    print(line(cells[0]), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in cells[1:]:
        print(line(r), file=out)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.2f}"
    return str(c)
