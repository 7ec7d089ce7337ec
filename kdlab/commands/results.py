"""`kdlab results FOLDER`: one table across the runs of a folder."""
from __future__ import annotations

import argparse
import fnmatch
import sys

from kdlab.errors import KDLabError

HELP = "one table of every finished run under a folder (seeds grouped: mean ± std)"
DESCRIPTION = """\
Read every run folder under FOLDER (a folder with result.json and config.yaml, at any
depth) and print one row per config: runs named <name>_seed<k> (kdlab train --seeds N)
are grouped under <name> with n, mean and sample standard deviation of the last-epoch and
best-epoch values of the task's headline metrics (top-1 and top-5; box AP, AP50 and mask AP;
--csv: every metric). A group whose configs differ beyond name and seed is flagged.

examples:
  kdlab results runs
  kdlab results runs --markdown > results.md
  kdlab results runs --csv > results.csv
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder holding run folders (e.g. runs)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table")
    fmt.add_argument("--csv", action="store_true", help="CSV with mean and std in separate columns")
    p.add_argument("--filter", default=None, metavar="GLOB", help="only runs whose group name matches GLOB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.experiments.results import find_runs, format_csv, format_text, group_runs, unfinished_runs

    groups = group_runs(find_runs(args.folder), root=args.folder)
    if args.filter:
        groups = [g for g in groups if fnmatch.fnmatch(g.group, args.filter)]
    if not groups:
        raise KDLabError(f"no finished runs (folders with result.json) under {args.folder!r}"
                         + (f" matching {args.filter!r}" if args.filter else "")
                         + "; train some with 'kdlab train CONFIG' or pass the output_dir they were written to")
    print(format_csv(groups) if args.csv else format_text(groups, markdown=args.markdown), end="")
    pending = unfinished_runs(args.folder)
    if pending and not args.csv:
        print(f"\n({len(pending)} unfinished run(s) not shown: {', '.join(p.name for p in pending[:5])}"
              f"{' ...' if len(pending) > 5 else ''})", file=sys.stderr)
    return 0
