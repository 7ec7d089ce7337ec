"""Running a chain of generations: every generation in order, nothing lost, nothing mixed.

A chain is a plan (`kdlab.plan`) of one train job per generation, generation m waiting for
generation m - 1: `prepare_chain` claims the chain and returns its jobs, `kdlab.plan.execute`
runs them (in this process, or each in a worker process with `--jobs`, or on Slurm) and
`finish_chain` lets the chain go and writes its report. A generation that fails skips the later
ones; the same command with `resume` continues where it stopped.

- A chain root that already holds generations is refused unless `resume` (finished
  generations are kept, an interrupted one continues from its `last.pt`) or `overwrite` (the old
  chain's files are deleted first): the run-folder rule of every kdlab command
  (`kdlab.engine.run_folder`).
- With `resume`, a generation folder trained with another config is refused (never silently
  reused), and so is a generation whose teacher was retrained after it learnt from it.
- The report (`kdlab.generations.report`) is written once every generation is finished.
- Under torchrun every rank runs the plan in its own process, one generation after another (the
  ranks train each generation together); only rank 0 writes the chain's files.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from kdlab.schema.experiment import check_run_name
from kdlab.engine.run_folder import RunFolder, RunFolderTaken, is_main_process, taken_message
from kdlab.errors import CheckpointError, ConfigError, KDLabError
from kdlab.generations.config import Chain
from kdlab.generations.report import write_report
from kdlab.plan import ExecOptions, Job, Plan, PlanReport, execute
from kdlab.plan.executor import run_plan_cli

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


def prepare_chain(chain: Chain, *, resume: bool = False, overwrite: bool = False,
                  after: Iterable[str] = ()) -> list[Job]:
    """Claim the chain (`claim_chain`: refused, or locked, and with `overwrite` cleared), write
    its chain.yaml, check its finished generations (`check_generation`) and return one train job
    per generation: generation m waits for generation m - 1, generation 0 for the jobs `after`.
    The jobs continue what their folders hold (resume, never overwrite: the chain is claimed
    here). The caller hands the chain back with `finish_chain` whatever happens."""
    main = is_main_process()  # under torchrun every rank plans the chain; rank 0 writes its files
    claim_chain(chain, resume=resume, overwrite=overwrite, is_main=main)
    try:
        if main:
            chain.root.mkdir(parents=True, exist_ok=True)
            (chain.root / "chain.yaml").write_text(yaml.safe_dump(chain.raw, sort_keys=False))
        finished = [check_generation(chain, m) for m in range(len(chain.configs))]
        for m in range(1, len(chain.configs)):
            if finished[m - 1] and not finished[m] and not chain.checkpoint(m - 1).is_file():
                raise CheckpointError(
                    f"generation {m - 1} is finished but {chain.checkpoint(m - 1)} is missing; retrain it with "
                    f"{RETRY} --overwrite, or set chain.checkpoint to the one that exists"
                )
        jobs: list[Job] = []
        waits = tuple(after)
        for m, cfg in enumerate(chain.configs):
            jobs.append(Job.train(cfg, run_dir=chain.run_dir(m), after=waits, resume=True, overwrite=False,
                                  label=f"{chain.name} gen{m}", what="generation", retry=RETRY))
            waits = (jobs[-1].name,)
        return jobs
    except BaseException:
        RunFolder(chain.root).release(abandon=True)  # a chain that never started leaves no folder behind
        raise


def finish_chain(chain: Chain, *, report: bool = True) -> dict[str, Any] | None:
    """Hand the chain root back (`prepare_chain` claimed it); then, when every generation is
    finished and `report`, write the report and return it (None otherwise, and on ranks > 0)."""
    RunFolder(chain.root).release()
    if not report or not is_main_process() or len(chain.finished_generations()) < len(chain.configs):
        return None
    return write_report(chain)


def chain_plan(chain: Chain, jobs: list[Job]) -> Plan:
    """The plan of a chain's jobs; a generation run in a worker process logs to
    `<output_dir>/logs/<chain name>_gen<m>.log`."""
    return Plan(f"{chain.name} {chain.settings.label}", list(jobs), log_dir=Path(chain.root).parent / "logs")


def check_exec_options(options: ExecOptions) -> None:
    """Under torchrun the ranks train each generation together, in their own processes: a chain
    cannot also start runs of its own (`--jobs` > 1, `--launcher slurm`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (options.jobs > 1 or options.launcher != "local"):
        flag = f"--jobs {options.jobs}" if options.jobs > 1 else f"--launcher {options.launcher}"
        raise ConfigError(f"{flag} starts runs of its own, but under torchrun every process trains each generation "
                          f"together with the others; drop {flag} (or run kdlab generations without torchrun)")


def train_chain(chain: Chain, *, resume: bool = False, overwrite: bool = False, report: bool = True,
                options: ExecOptions | None = None, stop_after: int | None = None,
                table: bool = False) -> tuple[PlanReport, dict[str, Any] | None]:
    """Claim the chain, run its unfinished generations as a plan, let it go. Returns what
    happened to each generation and the report (None unless every generation is finished and
    `report`). `stop_after=m` plans generations 0..m only (tests simulate interruptions with it);
    `table`: print the executor's table of jobs (`run_plan_cli`)."""
    options = options or ExecOptions()
    check_exec_options(options)
    jobs = prepare_chain(chain, resume=resume, overwrite=overwrite)
    if stop_after is not None:
        jobs, report = jobs[:stop_after + 1], False
    try:
        plan = chain_plan(chain, jobs)
        done = run_plan_cli(plan, options) if table else execute(plan, options)
    except BaseException:
        finish_chain(chain, report=False)
        raise
    return done, finish_chain(chain, report=report and not done.failed)


def run_chain(chain: Chain, *, resume: bool = False, overwrite: bool = False, report: bool = True,
              stop_after: int | None = None, options: ExecOptions | None = None) -> dict[str, Any] | None:
    """Train every unfinished generation in order, then write and return the report.

    `resume` / `overwrite`: what to do with a chain root that already holds generations (see
    `claim_chain`; checked before anything is written). `stop_after=m` stops once generation m
    is finished (tests use it to simulate interruptions). A generation that fails raises a
    `KDLabError` naming it, once the chain is handed back (`kdlab generations` prints the table
    of generations instead).
    """
    done, written = train_chain(chain, resume=resume, overwrite=overwrite, report=report, options=options,
                                stop_after=stop_after)
    if done.failed:
        first = done.failed[0]
        raise KDLabError(f"{first.job.label} {first.status}: {first.error}; once fixed, continue the chain with "
                         f"{RETRY} --resume")
    return written


__all__ = ["chain_plan", "chain_refusal", "check_exec_options", "check_generation", "claim_chain", "finish_chain",
           "generation_folders", "prepare_chain", "run_chain", "train_chain"]
