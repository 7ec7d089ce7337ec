"""Running a chain of generations: every generation in order, nothing lost, nothing mixed.

- A chain root that already holds generations is refused unless `resume` (finished
  generations are kept, an interrupted one continues from its `last.pt`) or `overwrite` (the old
  chain's files are deleted first): the run-folder rule of every kdlab command
  (`kdlab.engine.run_folder`).
- With `resume`, a generation folder trained with another config is refused (never silently
  reused), and so is a generation whose teacher was retrained after it learnt from it.
- The report (`kdlab.generations.report`) is written after the last generation.
"""
from __future__ import annotations

import logging
from typing import Any

import yaml

from kdlab.schema.experiment import check_run_name
from kdlab.engine.run_folder import RunFolder, RunFolderTaken, is_main_process, taken_message
from kdlab.engine.launch import train_run
from kdlab.errors import CheckpointError, ConfigError
from kdlab.generations.config import Chain
from kdlab.generations.report import write_report

log = logging.getLogger("kdlab")

RETRY = "kdlab generations CONFIG"
#: The chain's own files at its root, beside the generation folders.
CHAIN_FILES = ("chain.yaml", "generations.json", "generations.md")


def generation_folders(chain: Chain) -> list[RunFolder]:
    """Every `gen<m>` folder under the chain root, this chain's generations or not (a longer
    earlier chain may have left more), in order."""
    if not chain.root.is_dir():
        return []
    found = [p for p in chain.root.iterdir() if p.is_dir() and p.name[:3] == "gen" and p.name[3:].isdigit()]
    return [RunFolder(p) for p in sorted(found, key=lambda p: int(p.name[3:]))]


def chain_refusal(chain: Chain, *, resume: bool = False, overwrite: bool = False) -> str | None:
    """Why training this chain now would write over an earlier one (None when it would not):
    the chain root holds generations, and neither `resume` nor `overwrite` was asked for, or
    another process trains the chain now. A chain name that leaves output_dir is a `ConfigError`."""
    try:
        check_run_name(chain.name)
    except ValueError as exc:
        raise ConfigError(f"invalid chain config: experiment.{exc}") from None
    if resume and overwrite:
        return f"--resume and --overwrite contradict each other (both for {chain.root}); pass one"
    busy = RunFolder(chain.root).busy() if is_main_process() else None  # rank 0 holds the lock under torchrun
    if busy:
        return busy
    if resume or overwrite:
        return None
    taken = [f for f in generation_folders(chain) if f.holds_run()]
    if not taken:
        return None
    holds = "; ".join(f"{f.path.name}: {f.describe()}" for f in taken[:3]) + (" ..." if len(taken) > 3 else "")
    return taken_message(RunFolder(chain.root), "chain of generations", RETRY, holds=holds)


def claim_chain(chain: Chain, *, resume: bool = False, overwrite: bool = False, is_main: bool | None = None) -> None:
    """`RunFolder.claim` for a whole chain: raise `RunFolderTaken` (see `chain_refusal`), or with
    `overwrite` delete the earlier chain's files (its generations and reports) on the main process."""
    problem = chain_refusal(chain, resume=resume, overwrite=overwrite)
    if problem:
        raise RunFolderTaken(problem)
    main = is_main_process() if is_main is None else is_main
    if main:
        RunFolder(chain.root).lock()  # one writer per chain (each generation's folder is locked too)
    if overwrite and main:
        removed = [p for f in generation_folders(chain) for p in f.clear()]
        for name in CHAIN_FILES:
            if (chain.root / name).is_file():
                (chain.root / name).unlink()
                removed.append(chain.root / name)
        if removed:
            log.warning("--overwrite: deleted the earlier chain in %s (%d files)", chain.root, len(removed))


def check_generation(chain: Chain, m: int) -> bool:
    """True when generation m is finished. Raises when its folder holds a different run, or when
    its teacher changed after it was trained (the chain would no longer be a chain)."""
    folder = chain.folder(m)
    diffs = folder.differences(chain.configs[m])
    if diffs:
        raise ConfigError(
            f"{folder.path} holds generation {m} trained with another config ({'; '.join(diffs[:4])}); "
            f"train this chain under another name= (or output_dir=), or replace the old one: {RETRY} --overwrite"
        )
    done = folder.is_finished()
    # The student's own last.pt (written every epoch) dates its training; a teacher checkpoint
    # newer than it means generation m - 1 was retrained after m learnt from the old one.
    last = folder.checkpoint("last")
    student = last if last.is_file() else folder.result_path
    if m > 0 and student.is_file():
        teacher = chain.checkpoint(m - 1)
        if teacher.is_file() and teacher.stat().st_mtime > student.stat().st_mtime:
            state = "finished" if done else "started"
            raise CheckpointError(
                f"{teacher} was rewritten after generation {m} {state} training from it; retrain the "
                f"generations after it: {RETRY} --overwrite (or delete {folder.path} and every later generation)"
            )
    return done


def run_chain(chain: Chain, *, resume: bool = False, overwrite: bool = False, report: bool = True,
              stop_after: int | None = None) -> dict[str, Any] | None:
    """Train every unfinished generation in order, then write and return the report.

    `resume` / `overwrite`: what to do with a chain root that already holds generations (see
    `claim_chain`; checked before anything is written). `stop_after=m` stops once generation m
    is finished (tests use it to simulate interruptions).
    """
    main = is_main_process()  # under torchrun every rank runs the chain; rank 0 writes its files
    claim_chain(chain, resume=resume, overwrite=overwrite, is_main=main)
    try:
        return _train_chain(chain, main, report=report, stop_after=stop_after)
    except BaseException:
        RunFolder(chain.root).release(abandon=True)  # a chain that never started leaves no folder behind
        raise
    finally:
        RunFolder(chain.root).release()


def _train_chain(chain: Chain, main: bool, *, report: bool, stop_after: int | None) -> dict[str, Any] | None:
    if main:
        chain.root.mkdir(parents=True, exist_ok=True)
        (chain.root / "chain.yaml").write_text(yaml.safe_dump(chain.raw, sort_keys=False))
    for m, cfg in enumerate(chain.configs):
        if check_generation(chain, m):
            log.info("generation %d: finished earlier (%s), kept", m, chain.folder(m).result_path)
        else:
            if m > 0 and not chain.checkpoint(m - 1).is_file():
                raise CheckpointError(
                    f"generation {m - 1} is finished but {chain.checkpoint(m - 1)} is missing; retrain it with "
                    f"{RETRY} --overwrite, or set chain.checkpoint to the one that exists"
                )
            what = cfg.method.name if m == 0 else f"generation (lam {chain.settings.lam_of(m):g})"
            log.info("generation %d/%d: %s -> %s", m, chain.settings.generations, what, chain.run_dir(m))
            # resume=True: the chain is claimed above; an interrupted generation continues.
            train_run(cfg, resume=True, run_dir=chain.run_dir(m))
        if stop_after is not None and m >= stop_after:
            return None
    if not report or not main:
        return None
    return write_report(chain)


__all__ = ["chain_refusal", "check_generation", "claim_chain", "generation_folders", "run_chain"]
