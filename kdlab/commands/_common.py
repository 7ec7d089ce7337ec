"""Helpers shared by subcommands."""
from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied after the file, e.g. train.epochs=5 method.beta=8 data.root=/data",
    )


def print_table(headers: list[str], rows: list[list], file=None) -> None:
    """A plain aligned text table (readable in logs and pasteable into Markdown)."""
    import sys

    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in cells[1:]:
        print(line(r), file=out)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.2f}"
    return str(c)
