"""`kdlab train CONFIG [key=value ...]`."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from kdlab.commands._common import add_config_args, add_exec_args, add_run_folder_args, exec_options, resumed_run_imports

HELP = "train a model (a teacher from scratch, or a student with any method)"
DESCRIPTION = """\
Train the config's `model` with its `method` (vanilla = cross-entropy only; kd, dkd,
reviewkd, ... need a `teacher` with a checkpoint written by an earlier 'kdlab train').

Writes <output_dir>/<name>/: config.yaml (the resolved config), metrics.jsonl (one line
per epoch: every loss term and the task's validation metrics), tb/ (TensorBoard), last.pt and
best.pt (atomic checkpoints; train.save=last keeps both, last.pt with the optimizer state for
an exact --resume and best.pt with the weights only; best keeps best.pt alone; none keeps no
checkpoint), result.json (last and best values of the task's metrics: top-1/top-5, COCO AP).

Progress bars are drawn on a terminal only (not into a log file, not with 'kdlab -q');
train.progress=false turns them off. One line per epoch is logged either way.

A run folder that already holds a run (a checkpoint or result.json) is refused untouched:
continue it with --resume, train into another folder with name=<new name>, or replace it
with --overwrite (which deletes the files kdlab wrote for the earlier run, nothing else).
--resume continues the same experiment only: a config that differs from the run's
config.yaml in anything but where it is written, where the data lives, how fast it runs and
how it logs (kdlab.schema.compare.VOLATILE) is refused with the differing keys; so is a longer
train.epochs (to train longer, start a new run with model.checkpoint=<run>/last.pt).
config.yaml is never rewritten by --resume. One process writes a run folder at a time; a
second is refused with the pid and host of the first.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_run_folder_args(p, "continue from <run>/last.pt (or the given checkpoint); a finished run stays finished",
                        resume_checkpoint=True)
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train N runs with seeds train.seed, +1, ... as <name>_seed<seed>; print mean ± std "
                        "of the last and best values of the task's metrics (see 'kdlab results'); with --jobs, "
                        "several seeds at once")
    add_exec_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import load_config
    from kdlab.engine.run_folder import RunFolder, RunFolderTaken

    # A resumed run imports the plugins its config.yaml records, also those of an --import not repeated.
    cfg = load_config(args.config, args.overrides,
                      imports=resumed_run_imports(args.config, args.overrides) if args.resume else ())
    # The refusal's hint repeats the whole command: without the overrides, copying it would
    # resume (or replace) the run with another config.
    retry = shlex.join(["kdlab", "train", args.config, *args.overrides])
    if args.seeds is not None:
        from kdlab.errors import CheckpointError  # lazy: as above
        from kdlab.experiments.seeds import run_seeds_cli, seed_configs  # lazy: as above
        from kdlab.plan.jobs import missing_teacher_files  # lazy: as above

        # A problem every seed shares is one message before any seed starts, as without --seeds
        # (the executor would record it as one failure per seed).
        missing = missing_teacher_files(cfg)
        if missing:
            raise CheckpointError(f"{missing[0]}; train the teacher with 'kdlab train CONFIG' (it writes "
                                  f"<output_dir>/<name>/best.pt and last.pt) and point {missing[0].split()[0]} to it")

        # Every seed's folder is checked before the first seed trains.
        folders = [RunFolder.of(c) for c in seed_configs(cfg, args.seeds)]
        problems = [f.refusal(resume=args.resume, overwrite=args.overwrite, retry=f"{retry} --seeds {args.seeds}")
                    for f in folders]
        problems = [p for p in problems if p]
        if problems:
            more = f" ({len(problems) - 1} more seed folders hold runs too)" if len(problems) > 1 else ""
            raise RunFolderTaken(problems[0] + more)
        return run_seeds_cli(cfg, args.seeds, args.resume, args.overwrite, exec_options(args))
    if args.jobs != 1:
        from kdlab.errors import ConfigError  # lazy: as above

        raise ConfigError(f"--jobs {args.jobs} runs several runs at once: use it with --seeds N (or kdlab sweep, "
                          "reproduce, generations); a single run uses every core already")
    if args.launcher != "local":  # one run, submitted to the cluster
        from kdlab.plan import Job, Plan  # lazy: as above
        from kdlab.plan.executor import run_plan_cli

        job = Job.train(cfg, resume=bool(args.resume), overwrite=args.overwrite, retry=retry)
        return run_plan_cli(Plan(cfg.name, [job], log_dir=Path(cfg.output_dir) / "logs"),
                            exec_options(args)).exit_code()
    from kdlab.engine.launch import train_run_cli  # lazy: as above

    result, trainer = train_run_cli(cfg, resume=args.resume, overwrite=args.overwrite, retry=retry)
    if trainer.is_main:
        print(f"{cfg.name}: {result.summary()}  -> {result.run_dir}")
    return 0
