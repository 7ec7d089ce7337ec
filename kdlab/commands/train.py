"""`kdlab train CONFIG [key=value ...]`."""
from __future__ import annotations

import argparse

from kdlab.commands._common import add_config_args, add_run_folder_args

HELP = "train a model (a teacher from scratch, or a student with any method)"
DESCRIPTION = """\
Train the config's `model` with its `method` (vanilla = cross-entropy only; kd, dkd,
reviewkd, ... need a `teacher` with a checkpoint written by an earlier 'kdlab train').

Writes <output_dir>/<name>/: config.yaml (the resolved config), metrics.jsonl (one line
per epoch: every loss term, train and val top-1/top-5), tb/ (TensorBoard), last.pt and
best.pt (atomic checkpoints), result.json (last and best accuracy).

A run folder that already holds a run (a checkpoint or result.json) is refused untouched:
continue it with --resume, train into another folder with name=<new name>, or replace it
with --overwrite (which deletes the earlier run's files first).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    add_run_folder_args(p, "continue from <run>/last.pt (or the given checkpoint); a finished run stays finished",
                        resume_checkpoint=True)
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train N runs with seeds train.seed, +1, ... as <name>_seed<seed>; print mean ± std "
                        "of last and best top-1/top-5 (see 'kdlab results')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import load_config
    from kdlab.engine.run_folder import RunFolder, RunFolderTaken
    from kdlab.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    retry = f"kdlab train {args.config}"
    if args.seeds is not None:
        from kdlab.experiments.seeds import run_seeds_cli, seed_configs  # lazy: as above

        # Every seed's folder is checked before the first seed trains.
        folders = [RunFolder.of(c) for c in seed_configs(cfg, args.seeds)]
        problems = [f.refusal(resume=args.resume, overwrite=args.overwrite, retry=f"{retry} --seeds {args.seeds}")
                    for f in folders]
        problems = [p for p in problems if p]
        if problems:
            more = f" ({len(problems) - 1} more seed folders hold runs too)" if len(problems) > 1 else ""
            raise RunFolderTaken(problems[0] + more)
        for f in folders:
            f.claim(resume=args.resume, overwrite=args.overwrite)
        return run_seeds_cli(cfg, args.seeds, args.resume)
    from kdlab.engine.distributed import shutdown_distributed  # lazy: as above

    RunFolder.of(cfg).claim(resume=args.resume, overwrite=args.overwrite, retry=retry)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        result = trainer.fit()
    finally:
        shutdown_distributed()  # torchrun: leave the process group cleanly
    if trainer.is_main:
        print(f"{cfg.name}: {result.summary()}  -> {result.run_dir}")
    return 0
