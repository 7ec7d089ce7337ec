"""`kdlab sweep SWEEP.yaml [key=value ...]`: one experiment over a grid of settings and seeds."""
from __future__ import annotations

import argparse
import sys

from kdlab.commands._common import OVERWRITE_HELP, add_exec_args, exec_options
from kdlab.text_table import print_table

HELP = "train one experiment over a grid of settings x seeds and summarise mean ± std per point"
DESCRIPTION = """\
Train the experiment a sweep file names at every point of its grid (or list of points), each
with N seeds, then write <output_dir>/<sweep name>/sweep.md, sweep.json and sweep.png: mean ±
sample std over the seeds of every metric, per point (docs/sweeps.md).

  sweep:
    name: digits_dkd_beta              # runs: <output_dir>/<name>/<point>_seed<seed>/
    base: ../digits/dkd.yaml           # the experiment (or a generations chain), relative to this file
    teacher: ../digits/teacher.yaml    # optional: trained first into <output_dir>/<its name> if needed
    grid: {method.beta: [1.0, 8.0]}    # or points: [{method.alpha: 1, method.beta: 8}, ...]
    seeds: 2
    overrides: [train.epochs=3]        # for every config
    teacher_cache: false               # one teacher-output cache for every student (kd, dkd)
    metric: null                       # the figure's metric (default: the task's primary one)
  launcher: {}                         # Slurm resources for --launcher slurm

Before anything trains, every point's config is built (a key that does not exist or a value
of the wrong type is one error naming it) and every run folder is checked: a folder holding a
run of another config is refused (--overwrite replaces it). Running the same command again
reuses finished runs and continues interrupted ones; a run that fails does not stop the others
(its point is marked in the summary, and the exit status is 1).

Overrides: method.*, teacher.* apply to the students only; every other key (data.root,
train.epochs, output_dir, train.device, ...) to the teacher too.

examples:
  kdlab sweep configs/sweeps/digits_dkd_beta.yaml --jobs 2
  kdlab sweep configs/sweeps/cifar100_dkd_beta.yaml data.root=/data/cifar100 --dry-run
  kdlab sweep configs/sweeps/cifar100_dkd_beta.yaml data.root=/data/cifar100 --jobs 4 --jobs-per-device 2
  kdlab sweep configs/sweeps/cifar100_dkd_beta.yaml data.root=/data/cifar100 --report
  kdlab sweep configs/sweeps/cifar100_dkd_beta.yaml data.root=/data/cifar100 --launcher slurm

exit status: 0 when every run finished (or, with --launcher slurm, was submitted), 1 when a run
failed, 2 for a sweep that cannot run (nothing is trained then).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (configs/sweeps/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of every config, after the sweep's own (e.g. data.root=/data train.epochs=5)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="check everything and print the plan (points, seeds, run folders, teacher); train nothing")
    mode.add_argument("--report", action="store_true",
                      help="rewrite sweep.md/json/png from the runs finished so far; train nothing")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " (every run of the sweep; a "
                   "finished teacher of the same config is still reused)")
    add_exec_args(p)
    p.set_defaults(func=run)


def _plan_table(sp) -> None:
    # lazy: keeps `kdlab --help` fast (the sweep package reads configs through pydantic)
    from kdlab.sweep.config import format_value, key_titles

    titles = key_titles(sp.sweep.keys)
    print(f"sweep {sp.sweep.name}: {len(sp.sweep.points)} point(s) x {sp.sweep.seeds} seed(s), runs in {sp.root}")
    if sp.teacher_dir is not None:
        print(f"teacher: {sp.teacher_action} {sp.teacher_dir}")
    elif sp.teacher_action == "file":
        print("teacher: the base config's teacher.checkpoint / teacher.weights")
    if sp.cache_dir is not None:
        print(f"teacher cache: {sp.cache_action} {sp.cache_dir}")
    print_table(["point", *(titles[k] for k in sp.sweep.keys), "seed", "run folder", "action"],
                [[r.point.label, *(format_value(r.point.values[k]) for k in sp.sweep.keys), r.seed, str(r.run_dir),
                  r.action] for r in sp.runs])


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (the plan loads torch and every model)
    from kdlab.plan.executor import run_plan_cli
    from kdlab.sweep.config import load_sweep
    from kdlab.sweep.plan import check_data, plan_sweep
    from kdlab.sweep.summary import summarize, table_text, write_summary

    sweep = load_sweep(args.sweep)
    options = exec_options(args, sweep.launcher)  # bad flags fail before anything is planned
    if args.report and args.overwrite:
        print("--overwrite is ignored with --report (nothing is trained)", file=sys.stderr)
    sp = plan_sweep(sweep, args.overrides, overwrite=args.overwrite and not args.report,
                    check_folders=not args.report)
    if args.dry_run:
        _plan_table(sp)
        print(f"\ndry run: {len(sp.plan.jobs)} job(s) planned; nothing trained")
        return 0
    report = None
    if not args.report:
        check_data(sp)
        _plan_table(sp)
        print()
        report = run_plan_cli(sp.plan, options)
    data = summarize(sp, report)
    written = write_summary(sp.root, data)
    print()
    print(table_text(data), end="")
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    if report is not None and any(o.status == "submitted" for o in report.outcomes.values()):
        print(f"runs submitted to Slurm; once they finish: kdlab sweep {args.sweep} --report")
    return report.exit_code() if report is not None else 0
