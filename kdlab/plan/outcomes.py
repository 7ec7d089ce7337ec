"""What every way of running a plan shares (`kdlab.plan.executor` runs plans locally,
`kdlab.plan.slurm` through submitit): the options, one job's outcome, the report of a plan,
the live status line, and the rules a failure follows (its dependents are skipped)."""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdlab.errors import ConfigError, KDLabError
from kdlab.plan.jobs import Job, Plan
from kdlab.text_table import print_table

log = logging.getLogger("kdlab")

Status = Literal["done", "reused", "failed", "skipped", "interrupted", "submitted"]


@dataclass
class ExecOptions:
    """How to run a plan. `jobs`: runs at once (1: in this process, one after another).
    `jobs_per_device`: runs sharing one GPU. `launcher`: local, or slurm (submitit;
    `launcher_settings` holds its resources, `kdlab.plan.slurm`). `status`: draw the live
    status line (default: on a terminal). `threads`: CPU threads per job (default: the cores
    divided among the jobs)."""

    jobs: int = 1
    jobs_per_device: int = 1
    launcher: str = "local"
    launcher_settings: dict[str, Any] = field(default_factory=dict)
    status: bool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        if self.jobs_per_device < 1:
            raise ConfigError(f"--jobs-per-device must be at least 1, got {self.jobs_per_device}")
        if self.launcher not in ("local", "slurm", "submitit-local"):
            raise ConfigError(f"--launcher must be local or slurm, got {self.launcher!r}")


@dataclass
class Outcome:
    job: Job
    status: Status
    error: str = ""
    seconds: float = 0.0
    log: str | None = None


@dataclass
class PlanReport:
    """What happened to every job of a plan, in plan order."""

    plan: Plan
    outcomes: dict[str, Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status in ("failed", "skipped", "interrupted")]

    def ok(self, name: str) -> bool:
        """True when the job's run is there to read (trained now or earlier)."""
        o = self.outcomes.get(name)
        return o is not None and o.status in ("done", "reused")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o.status] = out.get(o.status, 0) + 1
        return out

    def table(self) -> str:
        """One line per job: run, status, minutes, the error or the reason it was skipped, its log."""
        rows = []
        for job in self.plan.jobs:
            o = self.outcomes[job.name]
            note = o.error or ("finished earlier" if o.status == "reused" else "")
            if o.log and o.status in ("failed", "interrupted"):
                note += f" (log: {o.log})"
            rows.append([job.label or job.name, o.status, f"{o.seconds / 60:.1f}" if o.seconds else "-", note])
        summary = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        out = io.StringIO()
        print_table(["run", "status", "min", "note"], rows, file=out)
        return out.getvalue() + f"{self.plan.name}: {summary}\n"

    def exit_code(self) -> int:
        return 1 if self.failed else 0


def failed_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, KDLabError) else f"{type(exc).__name__}: {exc}"


def skip_dependents(plan: Plan, name: str, outcomes: dict[str, Outcome]) -> None:
    for dep in plan.dependents(name):
        if dep.name not in outcomes:
            outcomes[dep.name] = Outcome(dep, "skipped", f"waits for {Path(name).name}, which did not finish")


def ready_jobs(plan: Plan, outcomes: dict[str, Outcome], running: set[str]) -> list[Job]:
    return [j for j in plan.jobs if j.name not in outcomes and j.name not in running
            and all(outcomes.get(a) is not None and outcomes[a].status in ("done", "reused") for a in j.after)]


class StatusLine:
    """done / running / failed / remaining and an ETA (from the finished jobs' mean time), as
    one redrawn line on a terminal, else one log line per finished job."""

    def __init__(self, plan: Plan, enabled: bool | None) -> None:
        self.total = len(plan.jobs)
        self.name = plan.name
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.monotonic()
        self.times: list[float] = []

    def update(self, outcomes: dict[str, Outcome], running: int, slots: int, finished: Outcome | None = None) -> None:
        if finished is not None and finished.status == "done":
            self.times.append(finished.seconds)
        counts: dict[str, int] = {}
        for o in outcomes.values():
            counts[o.status] = counts.get(o.status, 0) + 1
        left = self.total - len(outcomes)
        remaining = left - running
        eta = ""
        if self.times and left:
            per = sum(self.times) / len(self.times)
            eta = f", ETA {max(0.0, per * left / max(1, min(slots, left)) / 60):.0f} min"
        line = (f"{self.name}: {counts.get('done', 0) + counts.get('reused', 0)} done, {running} running, "
                f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped, {remaining} waiting{eta}")
        if self.tty:
            print("\r" + line[:200].ljust(80), end="", file=sys.stderr, flush=True)
        elif finished is not None:
            label = finished.job.label or finished.job.name
            log.info("[%s] %s %s%s | %s", self.name, label, finished.status,
                     f": {finished.error}" if finished.error else "", line)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a Slurm or cgroup share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """The cores divided among `jobs` concurrent runs, at least one each."""
    return max(1, (cores or cpu_cores()) // jobs)


def last_error(path: Path) -> str:
    """The error a worker printed last (its 'kdlab: error:' line, else its last line)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    marked = [ln for ln in lines if ln.startswith("kdlab worker: error:")]
    text = marked[-1].removeprefix("kdlab worker: error:").strip() if marked else (lines[-1] if lines else "")
    return text[:500]


__all__ = ["ExecOptions", "Outcome", "PlanReport", "Status", "StatusLine", "cpu_cores", "failed_message", "last_error",
           "ready_jobs", "skip_dependents", "threads_per_job"]
