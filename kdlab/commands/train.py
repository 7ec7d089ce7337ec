"""`kdlab train CONFIG [key=value ...]`."""
from __future__ import annotations

import argparse
import contextlib
import shlex
from typing import Any, Iterator

from kdlab.commands._common import add_config_args, add_run_folder_args

HELP = "train a model (a teacher from scratch, or a student with any method)"
DESCRIPTION = """\
Train the config's `model` with its `method` (vanilla = cross-entropy only; kd, dkd,
reviewkd, ... need a `teacher` with a checkpoint written by an earlier 'kdlab train').

Writes <output_dir>/<name>/: config.yaml (the resolved config), metrics.jsonl (one line
per epoch: every loss term, train and val top-1/top-5), tb/ (TensorBoard), last.pt and
best.pt (atomic checkpoints; train.save=last keeps both, last.pt with the optimizer state for
an exact --resume and best.pt with the weights only; best keeps best.pt alone; none keeps no
checkpoint), result.json (last and best accuracy).

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
                        "of last and best top-1/top-5 (see 'kdlab results')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import load_config
    from kdlab.engine.run_folder import RunFolder, RunFolderTaken

    cfg = load_config(args.config, args.overrides)
    # The refusal's hint repeats the whole command: without the overrides, copying it would
    # resume (or replace) the run with another config.
    retry = shlex.join(["kdlab", "train", args.config, *args.overrides])
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
        with claimed(folders, resume=args.resume, overwrite=args.overwrite, cfgs=seed_configs(cfg, args.seeds)):
            return run_seeds_cli(cfg, args.seeds, args.resume)
    with claimed([RunFolder.of(cfg)], resume=args.resume, overwrite=args.overwrite, cfgs=[cfg], retry=retry):
        result, is_main = _train_one(cfg, args)
    if is_main:
        print(f"{cfg.name}: {result.summary()}  -> {result.run_dir}")
    return 0


def _train_one(cfg: Any, args: argparse.Namespace) -> tuple[Any, bool]:
    from kdlab.engine.distributed import shutdown_distributed  # lazy: as in run
    from kdlab.engine.trainer import Trainer  # lazy: as in run

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        return trainer.fit(), trainer.is_main
    finally:
        shutdown_distributed()  # torchrun: leave the process group cleanly


@contextlib.contextmanager
def claimed(folders: list[Any], *, resume: bool | str, overwrite: bool, cfgs: list[Any],
            retry: str = "") -> Iterator[None]:
    """Claim the run folders (locked, checked, cleared with `overwrite`) for the block; a block
    that fails before a run wrote anything leaves none of the folders it created behind."""
    try:
        for folder, cfg in zip(folders, cfgs):
            folder.claim(resume=resume, overwrite=overwrite, retry=retry, cfg=cfg)
        yield
    except BaseException:
        for folder in folders:
            folder.release(abandon=True)
        raise
    for folder in folders:
        folder.release()
