"""`kdlab reproduce`: the papers' result tables, listed and re-run."""
from __future__ import annotations

import argparse
import json
import math
import sys

from kdlab.commands._common import add_exec_args, add_run_folder_args, exec_options
from kdlab.errors import ConfigError
from kdlab.text_table import print_table

HELP = "list the papers' published numbers, or train chosen rows and compare measured vs published"
DESCRIPTION = """\
The papers' result tables as data (kdlab/reproduce/rows.yaml): one row per published number
with its paper, table, teacher, student, method, config and metric.

  kdlab reproduce --list [GLOB]          every row (or those matching GLOB)
  kdlab reproduce ROW... [key=value]     train the rows and print measured vs published

Rows are ids or globs ('dkd/cifar100/*'). Before any training, every chosen row is checked:
its config (and teacher config) must exist and validate, its dataset must be readable
(pass data.root=PATH), its teacher checkpoint or weights must exist or be trainable from
the row's teacher config. A row that cannot run says why; the others still run. Teachers
are trained first when their checkpoint is missing (a finished teacher is reused). A row whose
run folder already holds a run is refused untouched: pass --resume to reuse finished runs and
continue interrupted ones, or --overwrite to delete and retrain them. A top1_gain row (DKD
Table 1) also runs its baseline row (the student alone).

All the rows' runs are one plan (kdlab.plan): a teacher shared by several rows trains once,
each row's runs wait for their teacher only. --jobs N trains N runs at once (logs in
<output_dir>/logs/), --launcher slurm submits one Slurm job per run with the resources of
--launcher-config FILE.yaml. A run that fails fails its own rows (and the rows waiting for
its teacher); the others go on. Run the same command with --resume to continue.

Overrides: method.*, teacher.* and name apply to the row's own config; every other key
(data.root, train.epochs, output_dir, train.device, ...) to its teacher's config too. With
--seeds N each row trains N seeds; its teacher is trained once.

examples:
  kdlab reproduce --list 'dkd/*'
  kdlab reproduce dkd/cifar100/resnet32x4_resnet8x4 kd/cifar100/resnet32x4_resnet8x4 data.root=/data/cifar100
  kdlab reproduce 'dkd/cifar100/*' data.root=/data/cifar100 --dry-run
  kdlab reproduce dkd/cifar100/resnet32x4_resnet8x4 data.root=/data/cifar100 --seeds 3
  kdlab reproduce 'dkd/cifar100/*' data.root=/data/cifar100 --resume   # after an interruption
  kdlab reproduce 'kd/cifar100/*' data.root=/data/cifar100 --jobs 4     # 4 runs at once (GPUs: one each)
  kdlab reproduce 'dkd/cifar100/*' data.root=/data/cifar100 --launcher slurm --launcher-config slurm.yaml

exit status: 0 when every row was measured (or, with --launcher slurm, submitted), 1 otherwise
(a row that cannot run, a run that failed, a row without its measurement).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="ROW|key=value",
                   help="row ids or globs, then dotted overrides (e.g. data.root=/data/cifar100)")
    p.add_argument("--list", action="store_true", help="list the rows (filtered by the ROW globs, if any)")
    p.add_argument("--dry-run", action="store_true", help="check and show the plan; train nothing")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train each row with N seeds (<name>_seed<k>) and compare the mean")
    p.add_argument("--root", default=None, help="folder the rows' configs/ paths are relative to "
                   "(default: the current folder if it has configs/, else the kdlab checkout)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the outcomes as JSON")
    add_run_folder_args(p, "reuse the rows' finished runs and continue interrupted ones in their folders")
    add_exec_args(p)
    p.set_defaults(func=run)


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.2f}" if isinstance(x, float) and x < 0 else f"{x:.2f}"


def _signed(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.2f}"


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast; --list reads the table alone, without torch
    from kdlab.reproduce.table import load_rows, repo_root, select_rows

    patterns = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    rows = load_rows()
    if args.list:
        chosen = select_rows(patterns, rows) if patterns else rows
        root = repo_root(args.root)
        table = []
        for r in chosen:
            cfg = r.config or "(none yet)"
            if r.config and not (root / r.config).is_file():
                cfg += " (missing)"
            table.append([r.id, r.paper.split(" (")[0], r.table, r.metric, _num(r.published), cfg])
        print_table(["row", "paper", "table", "metric", "published", "config"], table)
        print(f"\n{len(chosen)} of {len(rows)} rows. Run some with: kdlab reproduce ROW... data.root=PATH")
        return 0
    if not patterns:
        raise ConfigError("name the rows to reproduce (ids or globs; see 'kdlab reproduce --list'), "
                          "e.g. kdlab reproduce dkd/cifar100/resnet32x4_resnet8x4 data.root=/data/cifar100")
    # lazy: the runner trains (torch and every model), which --list does not need
    from kdlab.reproduce.runner import plan_rows, reproduce

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    options = exec_options(args)  # bad flags fail before anything is planned
    plans = plan_rows(select_rows(patterns, rows), overrides, root=args.root, seeds=args.seeds, all_rows=rows,
                      resume=args.resume, overwrite=args.overwrite)
    problems = [p for p in plans if p.problem]
    print_table(["row", "status", "teacher", "run folder"],
                [[p.row.id + (" (baseline)" if p.is_dependency else ""), p.status, p.teacher_action,
                  ", ".join(str(d) for d in p.run_dirs) or "-"] for p in plans], file=sys.stderr)
    for p in problems:
        print(f"{p.row.id}: cannot run: {p.problem}", file=sys.stderr)
    if args.dry_run:
        print(f"\ndry run: {len(plans) - len(problems)} row(s) ready, {len(problems)} cannot run", file=sys.stderr)
        return 1 if problems else 0
    outcomes = reproduce(plans, options)
    print()
    print_table(["row", "metric", "published", "last", "diff", "best", "diff", "seeds", "status"], [
        [o.row.id + (" (baseline)" if o.is_dependency else ""), o.row.metric, _num(o.row.published), _num(o.last),
         _signed(o.diffs()[0]), _num(o.best), _signed(o.diffs()[1]), o.n or "-", o.status] for o in outcomes
    ])
    printed = {p.row.id for p in problems}  # their reasons were printed before training
    for o in outcomes:
        if o.problem and o.row.id not in printed:
            print(f"{o.row.id}: {o.status}: {o.problem}", file=sys.stderr)
    cannot = sum(o.status == "cannot run" for o in outcomes)
    if cannot:
        print(f"{cannot} row(s) could not run; the reasons are printed above", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([o.to_json() for o in outcomes], f, indent=2)
    return 0 if all(o.status in ("measured", "submitted") for o in outcomes) else 1
