"""Run a plan: in this process one job after another, or N jobs at once in worker
subprocesses, or on Slurm through submitit (`kdlab.plan.slurm`).

The rules are the same everywhere:

- a job whose run is finished is not run again (`reused`); an interrupted one continues;
- a job that fails is recorded with its error (`failed`); every job waiting for it,
  directly or not, is `skipped`; the others go on;
- the command ends with `PlanReport.table()` and exits non-zero when anything failed.

Parallel jobs on one machine (`ExecOptions.jobs` > 1) each run in a fresh process
(`python -m kdlab.plan.worker`), so that a crash, an out-of-memory kill or a disk-full error
fails one run only. The CPU cores are divided among them (`threads_per_job`): oversubscribed
OpenMP threads do not merely share the cores, they wait for each other at every parallel
region (docs/speed.md, "Several runs at once"). On GPUs each job sees one device
(CUDA_VISIBLE_DEVICES), `jobs_per_device` jobs per device. Each job logs to
`<log_dir>/<label>.log`. A result does not depend on what ran beside it: a job's weights are
a function of its config, seed and thread count only.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from kdlab.errors import KDLabError
from kdlab.plan.jobs import Job, Plan, run_job
from kdlab.plan.outcomes import (ExecOptions, Outcome, PlanReport, StatusLine, cpu_cores, failed_message,
                                 last_error, ready_jobs, skip_dependents, threads_per_job)

log = logging.getLogger("kdlab")


def execute(plan: Plan, options: ExecOptions | None = None) -> PlanReport:
    """Run every job of `plan` that is not finished, its dependencies first (see the module)."""
    options = options or ExecOptions()
    plan.check()
    outcomes: dict[str, Outcome] = {}
    for job in plan.jobs:
        if job.is_finished():
            outcomes[job.name] = Outcome(job, "reused")
    if options.launcher != "local":
        from kdlab.plan.slurm import submit_plan  # lazy: submitit is an optional extra

        return submit_plan(plan, options, outcomes)
    runner = _InProcess() if options.jobs == 1 else _Subprocesses(plan, options)
    return runner.run(plan, outcomes, StatusLine(plan, options.status))


class _InProcess:
    """One job after another in this process (the default; a lone run prints as `kdlab train` does)."""

    def run(self, plan: Plan, outcomes: dict[str, Outcome], status: StatusLine) -> PlanReport:
        # The first job whose dependencies are done, again and again: plan order where it can be.
        # A failure marks its dependents skipped, so nothing waits forever (the plan has no cycle).
        while ready := ready_jobs(plan, outcomes, set()):
            job = ready[0]
            t0 = time.perf_counter()
            try:
                run_job(job)
            except KeyboardInterrupt:
                outcomes[job.name] = Outcome(job, "interrupted", "stopped by Ctrl-C", time.perf_counter() - t0)
                raise
            except Exception as exc:  # noqa: BLE001 - a failed run is recorded; the others go on
                log.error("%s failed: %s", job.label or job.name, failed_message(exc),
                          exc_info=not isinstance(exc, KDLabError))
                outcomes[job.name] = Outcome(job, "failed", failed_message(exc), time.perf_counter() - t0)
                skip_dependents(plan, job.name, outcomes)
                continue
            outcomes[job.name] = Outcome(job, "done", seconds=time.perf_counter() - t0)
        return PlanReport(plan, outcomes)


def worker_env(threads: int, device: int | None) -> dict[str, str]:
    """The environment of a worker: its thread count for every OpenMP/BLAS runtime, and one GPU."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KDLAB_THREADS"):
        env[var] = str(threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    return env


def _gpu_count(plan: Plan) -> int:
    """GPUs the jobs will use: 0 when they all train on the CPU or no GPU is there."""
    devices = {str(j.config.get("train", {}).get("device", "auto")) for j in plan.jobs}
    if devices <= {"cpu"}:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    import torch  # lazy: the parent of CPU-only plans never needs it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A worker whose parent dies (even by SIGKILL) gets SIGINT: it saves its place and exits."""
    try:
        import ctypes  # lazy: only Linux workers need it, between fork and exec

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Subprocesses:
    """Up to `jobs` workers at once, each a `python -m kdlab.plan.worker` process with its share
    of the cores and, on GPUs, one device."""

    def __init__(self, plan: Plan, options: ExecOptions) -> None:
        gpus = _gpu_count(plan)
        self.slots = min(options.jobs, gpus * options.jobs_per_device) if gpus else options.jobs
        self.devices = list(range(gpus))
        self.threads = options.threads or threads_per_job(self.slots)
        self.log_dir = Path(plan.log_dir or "runs/logs")
        if gpus and options.jobs > self.slots:
            log.warning("--jobs %d: %d GPU(s) x --jobs-per-device %d allow %d at once", options.jobs, gpus,
                        options.jobs_per_device, self.slots)
        self.per_device = options.jobs_per_device
        self.log_names: dict[str, str] = {}
        for job in plan.jobs:  # one file per job, named after it (two jobs of one label: numbered)
            stem = (job.label or Path(job.name).name).replace("/", "_").replace(" ", "_")
            name, k = f"{stem}.log", 2
            while name in self.log_names.values():
                name, k = f"{stem}.{k}.log", k + 1
            self.log_names[job.name] = name

    def _log_path(self, job: Job) -> Path:
        return self.log_dir / self.log_names[job.name]

    def _start(self, job: Job, device: int | None) -> subprocess.Popen:
        path = self._log_path(job)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = open(path, "a")
        except OSError as exc:
            raise KDLabError(f"cannot write the run log {path}: {exc}; make {path.parent} writable") from None
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.label or job.name}: {self.threads} thread(s)"
                  f"{'' if device is None else f', GPU {device}'}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "kdlab.plan.worker"], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, env=worker_env(self.threads, device),
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                                text=True)
        out.close()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job.to_json()))
        proc.stdin.close()
        return proc

    def run(self, plan: Plan, outcomes: dict[str, Outcome], status: StatusLine) -> PlanReport:
        running: dict[str, tuple[subprocess.Popen, float, int | None]] = {}
        try:
            while True:
                for job in ready_jobs(plan, outcomes, set(running)):
                    if len(running) >= self.slots:
                        break
                    device = None
                    if self.devices:
                        load = {d: sum(1 for _, _, dd in running.values() if dd == d) for d in self.devices}
                        device = min(self.devices, key=lambda d: load[d])
                    try:
                        running[job.name] = (self._start(job, device), time.perf_counter(), device)
                    except (OSError, KDLabError) as exc:
                        outcomes[job.name] = Outcome(job, "failed", failed_message(exc))
                        skip_dependents(plan, job.name, outcomes)
                    status.update(outcomes, len(running), self.slots)
                if not running:
                    break
                time.sleep(0.2)
                for name, (proc, t0, _) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[name]
                    job = next(j for j in plan.jobs if j.name == name)
                    log_path = str(self._log_path(job))
                    seconds = time.perf_counter() - t0
                    if rc == 0:
                        outcomes[name] = Outcome(job, "done", seconds=seconds, log=log_path)
                    else:
                        why = last_error(Path(log_path)) or f"exit status {rc}"
                        if rc < 0:
                            why = f"killed by signal {-rc}"
                        outcomes[name] = Outcome(job, "interrupted" if rc == 130 else "failed", why, seconds, log_path)
                        skip_dependents(plan, name, outcomes)
                    status.update(outcomes, len(running), self.slots, outcomes[name])
        except KeyboardInterrupt:
            # The terminal's Ctrl-C reached the workers too (one process group): each saves its
            # place and exits; wait for them so that no checkpoint is cut short.
            for name, (proc, t0, _) in running.items():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                job = next(j for j in plan.jobs if j.name == name)
                outcomes[name] = Outcome(job, "interrupted", "stopped by Ctrl-C", time.perf_counter() - t0,
                                         str(self._log_path(job)))
            raise
        finally:
            status.close()
        return PlanReport(plan, outcomes)


def run_plan_cli(plan: Plan, options: ExecOptions, *, on_report: Callable[[PlanReport], None] | None = None) -> PlanReport:
    """`execute` for a command: prints the table of jobs (when the plan has more than one, or one failed)."""
    report = execute(plan, options)
    if len(plan.jobs) > 1 or report.failed:
        print(report.table(), end="")
    if on_report is not None:
        on_report(report)
    return report


__all__ = ["ExecOptions", "Outcome", "PlanReport", "cpu_cores", "execute", "run_plan_cli", "threads_per_job",
           "worker_env"]
