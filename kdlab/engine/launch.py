"""Claim a run folder, train into it, let it go: the one way every command trains a run
(`kdlab train`, `--seeds`, `generations`, `reproduce`, the demo).

`claimed` runs `RunFolder.claim` on every folder before the block (the folder is checked,
locked, cleared with `overwrite`) and releases them after it; the `Trainer` is given the claimed
folder, so a run's folder is claimed once.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from kdlab.engine.callbacks import Callback
from kdlab.engine.distributed import shutdown_distributed
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import RunFolder
from kdlab.engine.trainer import Trainer
from kdlab.schema.experiment import ExperimentConfig


@contextlib.contextmanager
def claimed(folders: Sequence[RunFolder], *, resume: bool | str, overwrite: bool,
            cfgs: Sequence[Any] | None = None, what: str = "run", retry: str = "") -> Iterator[None]:
    """Claim the run folders (checked against `cfgs` on resume, locked, cleared with `overwrite`)
    for the block; a block that fails leaves none of the empty folders it created behind."""
    try:
        for folder, cfg in zip(folders, cfgs or [None] * len(folders)):
            folder.claim(resume=resume, overwrite=overwrite, what=what, retry=retry, cfg=cfg)
        yield
    except BaseException:
        for folder in folders:
            folder.release(abandon=True)
        raise
    for folder in folders:
        folder.release()


def train_run(cfg: ExperimentConfig, *, resume: bool | str = False, overwrite: bool = False,
              run_dir: str | Path | None = None, callbacks: Iterable[Callback] = (), what: str = "run",
              retry: str = "") -> tuple[RunResult, Trainer]:
    """Claim the folder of `cfg` (`run_dir`, default `<output_dir>/<name>`), train into it and
    release it. Returns the result and the trainer (its `is_main`: under torchrun only the main
    process prints; its `data`: what the run trained and evaluated on)."""
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.of(cfg)
    with claimed([folder], resume=resume, overwrite=overwrite, cfgs=[cfg], what=what, retry=retry):
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks, folder=folder)
        return trainer.fit(), trainer


def train_run_cli(cfg: ExperimentConfig, **kwargs: Any) -> tuple[RunResult, Trainer]:
    """`train_run` for a command: under torchrun the process group is left cleanly, also on error."""
    try:
        return train_run(cfg, **kwargs)
    finally:
        shutdown_distributed()


__all__ = ["claimed", "train_run", "train_run_cli"]
