"""`kdlab plot RUN_DIR [RUN_DIR ...] --out curves.png`: training curves."""
from __future__ import annotations

import argparse

HELP = "plot the task's metric (top-1, box/mask AP) and every loss term over epochs, one run or several overlaid"
DESCRIPTION = """\
Read each run's metrics.jsonl and draw one PNG: a panel for the task's metric (top-1; box AP,
and mask AP for Mask R-CNN; val solid, train dashed where logged) and one per loss term
(train/<term>, as weighted in the loss, and their sum train/loss), one colour per run. A folder without metrics.jsonl stands for every run below it.

examples:
  kdlab plot runs/kd_resnet32x4_resnet8x4 runs/dkd_resnet32x4_resnet8x4 --out kd_vs_dkd.png
  kdlab plot runs/sweep --out sweep.png --stats --lr
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl) or folders of runs")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    p.add_argument("--stats", action="store_true", help="also plot the method diagnostics (stat/...)")
    p.add_argument("--lr", action="store_true", help="also plot the learning rate")
    p.add_argument("--log", action="store_true", help="symmetric-log scale for the loss panels")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdlab.analysis.curves import plot_curves  # lazy: keeps `kdlab --help` fast (matplotlib)

    info = plot_curves(args.runs, args.out, labels=args.labels, stats=args.stats, lr=args.lr, log_loss=args.log)
    print(f"{info['path']}: {len(info['runs'])} run(s) ({', '.join(info['runs'])}); "
          f"panels: {', '.join(info['panels'])}")
    return 0
