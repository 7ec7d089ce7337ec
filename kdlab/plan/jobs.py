"""Jobs (one run folder or one teacher cache, from a config kept as plain data) and plans
(jobs in order, with the jobs each waits for).

A job holds its config as the dict `config_to_dict` writes, not as an object: it travels as
JSON to a worker process (`python -m kdlab.plan.worker`) or pickled to a Slurm job, and is
validated again where it runs (plugins named by its `imports:` are imported there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

from kdlab.config.loader import config_to_dict, load_config
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import ConfigError

log = logging.getLogger("kdlab")

Kind = Literal["train", "cache"]


@dataclass(frozen=True)
class Job:
    """One unit of a plan.

    `name`: unique in its plan (the run folder, or the cache folder, as given). `kind`: train
    (train `config` into `run_dir`) or cache (build the teacher-output cache of `config`'s
    teacher into `run_dir`). `after`: names of the jobs that must have finished first.
    `resume`: continue an interrupted run in the folder (a finished one is reused, never
    retrained); `overwrite`: delete what the folder holds and train again. `what`/`retry`:
    how refusals name the run and the command to repeat. `gpus`: processes of a DDP run
    (Slurm: one task per GPU; locally a job uses one device)."""

    name: str
    config: dict[str, Any]
    run_dir: str
    kind: Kind = "train"
    after: tuple[str, ...] = ()
    resume: bool = True
    overwrite: bool = False
    label: str = ""
    what: str = "run"
    retry: str = ""
    gpus: int = 1

    @classmethod
    def train(cls, cfg: Any, *, run_dir: str | Path | None = None, after: Iterable[str] = (), **kwargs: Any) -> "Job":
        """A job training the validated config `cfg` into `run_dir` (default `<output_dir>/<name>`)."""
        folder = Path(run_dir) if run_dir is not None else RunFolder.of(cfg).path
        return cls(name=str(folder), config=config_to_dict(cfg), run_dir=str(folder), after=tuple(after),
                   label=kwargs.pop("label", "") or cfg.name, **kwargs)

    @classmethod
    def cache(cls, cfg: Any, path: str | Path, *, after: Iterable[str] = (), **kwargs: Any) -> "Job":
        """A job building the teacher-output cache of `cfg`'s teacher at `path`."""
        return cls(name=str(path), config=config_to_dict(cfg), run_dir=str(path), kind="cache", after=tuple(after),
                   label=kwargs.pop("label", "") or f"teacher cache {Path(path).name}", **kwargs)

    def experiment(self) -> Any:
        """The validated config (imports its plugins)."""
        return load_config(data=self.config)

    def is_finished(self) -> bool:
        """Nothing left to do: a finished run (or a complete cache), and not asked to overwrite it."""
        if self.overwrite:
            return False
        if self.kind == "cache":
            from kdlab.engine.teacher_cache.format import cache_is_complete  # lazy: hashing needs the cache module

            return cache_is_complete(self.run_dir, self.experiment())
        return RunFolder(self.run_dir).is_finished()

    def resumed(self) -> "Job":
        """The job as a requeued or repeated attempt runs it: continue, never delete again."""
        return replace(self, resume=True, overwrite=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "run_dir": self.run_dir, "kind": self.kind,
                "after": list(self.after), "resume": self.resume, "overwrite": self.overwrite, "label": self.label,
                "what": self.what, "retry": self.retry, "gpus": self.gpus}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        return cls(**{**data, "after": tuple(data.get("after", ()))})


def missing_teacher_files(cfg: Any) -> list[str]:
    """The teacher files `cfg` names that are not there, each as '<key> <path> does not exist':
    checked by every command that plans runs before any of them starts, so that a problem all
    the runs share is one message, not one failure per run."""
    if cfg.teacher is None:
        return []
    return [f"{key} {value!r} does not exist" for key, value in
            (("teacher.checkpoint", cfg.teacher.checkpoint), ("teacher.weights", cfg.teacher.weights))
            if value and not Path(value).is_file()]


def run_job(job: Job) -> None:
    """Do the job in this process: train its run (claiming the folder as `kdlab train` does) or
    build its teacher cache. A finished run is left as it is."""
    from kdlab.engine.launch import train_run  # lazy: keeps the worker's start light until it runs

    cfg = job.experiment()
    if job.kind == "cache":
        # lazy: only cache jobs load the cache builder (numpy memmaps, the teacher)
        from kdlab.engine.device import resolve_device  # lazy: as above
        from kdlab.engine.run_folder import claim_cache_folder  # lazy: as above
        from kdlab.engine.teacher_cache import build_cache  # lazy: as above
        from kdlab.engine.teacher_cache.format import cache_is_complete  # lazy: as above

        if cache_is_complete(job.run_dir, cfg) and not job.overwrite:
            return
        claim_cache_folder(job.run_dir, overwrite=True, retry=job.retry or "kdlab cache-teacher CONFIG")
        build_cache(cfg, job.run_dir, device=resolve_device(cfg.train.device), overwrite=True,
                    progress=cfg.train.progress)
        return
    if job.is_finished():
        return
    train_run(cfg, resume=job.resume, overwrite=job.overwrite, run_dir=job.run_dir, what=job.what, retry=job.retry)


@dataclass
class Plan:
    """Jobs in the order they should start when nothing else holds them back (teachers first).
    `name`: what the status line and the table call the plan; `log_dir`: where a job run in a
    subprocess writes its log (`<log_dir>/<job label>.log`)."""

    name: str
    jobs: list[Job] = field(default_factory=list)
    log_dir: Path | None = None

    def add(self, job: Job) -> Job:
        """Add `job` once: a job of the same name already in the plan (a teacher shared by
        several rows) is kept, and its `after` is merged."""
        for i, old in enumerate(self.jobs):
            if old.name == job.name:
                if old.config != job.config or old.kind != job.kind:
                    raise ConfigError(f"{job.name} is planned twice with different configs; give one of them "
                                      "another name= or output_dir=")
                self.jobs[i] = replace(old, after=tuple(dict.fromkeys(old.after + job.after)))
                return self.jobs[i]
        self.jobs.append(job)
        return job

    def check(self) -> None:
        """Every `after` names a job of the plan, and the jobs form no cycle."""
        names = {j.name for j in self.jobs}
        for j in self.jobs:
            missing = [a for a in j.after if a not in names]
            if missing:
                raise ConfigError(f"job {j.name} waits for {missing[0]}, which is not in the plan")
        done: set[str] = set()
        left = list(self.jobs)
        while left:
            ready = [j for j in left if set(j.after) <= done]
            if not ready:
                raise ConfigError(f"the plan's jobs wait for each other in a cycle: {', '.join(j.name for j in left)}")
            done |= {j.name for j in ready}
            left = [j for j in left if j.name not in done]

    def dependents(self, name: str) -> list[Job]:
        """Every job that waits for `name`, directly or through others."""
        out: list[Job] = []
        frontier = {name}
        while frontier:
            nxt = [j for j in self.jobs if frontier & set(j.after) and j not in out]
            out += nxt
            frontier = {j.name for j in nxt}
        return out


__all__ = ["Job", "Plan", "missing_teacher_files", "run_job"]
