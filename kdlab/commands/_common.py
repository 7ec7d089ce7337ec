"""Helpers shared by subcommands."""
from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied after the file, e.g. train.epochs=5 method.beta=8 data.root=/data",
    )


OVERWRITE_HELP = "replace what the run folder holds: delete the earlier run's files first, then train from scratch"


def add_run_folder_args(p: argparse.ArgumentParser, resume_help: str, *, resume_checkpoint: bool = False) -> None:
    """--resume and --overwrite (one or the other): the two ways to train into a folder that
    already holds a run (the third is another name=); without either, such a folder is refused
    untouched (kdlab.engine.run_folder). `resume_checkpoint`: --resume may name the checkpoint."""
    g = p.add_mutually_exclusive_group()
    if resume_checkpoint:
        g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT", help=resume_help)
    else:
        g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
