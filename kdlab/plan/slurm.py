"""A plan on Slurm (`--launcher slurm`) through submitit: one Slurm job per plan job
(docs/cluster.md).

- Every job that is not finished is submitted in plan order; a job waits for the jobs of its
  `after` with `--dependency=afterok:<ids>` (and `--kill-on-invalid-dep=yes`: when a teacher
  fails, Slurm drops the students waiting for it instead of keeping them pending forever).
- The callable Slurm runs is `JobRunner(job)`: `run_job(job)`, as in a local worker. On
  preemption or at the time limit Slurm sends SIGUSR2 (submitit's `--signal`); the run stops
  at the end of its step with a checkpoint, the way Ctrl-C stops it, and `checkpoint()`
  requeues `JobRunner(job.resumed())`, which continues from that checkpoint.
- A job of G > 1 GPUs (`Job.gpus`, or the `gpus_per_job` setting) is one DDP run: G tasks, one
  process per GPU; each exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (submitit's
  `TorchDistributedEnvironment`) and the trainer joins the process group as under torchrun.
- With `wait` (the default) the command waits, prints what finished, and ends with the usual
  table (done / failed / skipped / reused). Ctrl-C leaves the jobs queued; the same command
  run again finds them in the queue (`<folder>/kdlab-jobs.json` holds their ids) and waits for
  them instead of submitting them twice. Without `wait` the jobs are `submitted`.

`submitit-local` runs the same jobs as local submitit subprocesses (no Slurm, no dependencies:
a job starts when its dependencies have finished); the tests use it.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator

from kdlab.config.loader import format_validation_errors
from kdlab.errors import ConfigError, KDLabError
from kdlab.plan.jobs import Job, Plan, run_job
from kdlab.plan.outcomes import (ExecOptions, Outcome, PlanReport, StatusLine, failed_message, last_error,
                                 ready_jobs, skip_dependents, threads_per_job)
from kdlab.schema.experiment import StrictModel

log = logging.getLogger("kdlab")

INSTALL = "pip install 'kdlab[slurm]'"
#: Slurm's limit when `time_min` is not set: one day. A longer run is requeued at the limit and continues.
DEFAULT_TIME_MIN = 24 * 60
#: Requeues at the time limit before a job counts as failed (a resumed run loses nothing, so many).
MAX_TIMEOUT_REQUEUES = 20
#: sbatch options submitit or the plan set themselves (an `sbatch:` line must not replace them).
RESERVED_SBATCH = {"output", "error", "open_mode", "array", "signal", "dependency", "job_name"}
RECORD = "kdlab-jobs.json"
ERROR_MARK = "kdlab worker: error:"  # the line `last_error` reads, as the local workers print it


class LauncherSettings(StrictModel):
    """The `launcher:` block of a sweep file (or `--launcher-config`): Slurm resources per job."""

    partition: str | None = None
    gpus_per_job: NonNegativeInt | None = None  # default: 1 (0 for a config with train.device: cpu)
    cpus_per_job: PositiveInt | None = None  # cores of the job, shared by its processes
    mem_gb: PositiveFloat | None = None
    time_min: PositiveInt = DEFAULT_TIME_MIN
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: list[str] = []  # more sbatch options, e.g. ["--exclusive", "--gres=gpu:a100:1"]
    folder: str | None = None  # submitit's folder (logs, pickles); default <plan log_dir>/slurm
    wait: bool = True

    @field_validator("sbatch")
    @classmethod
    def _long_options(cls, value: list[str]) -> list[str]:
        for text in value:
            sbatch_option(text)
        return value


def launcher_settings(raw: dict[str, Any] | None) -> LauncherSettings:
    """The checked settings; every problem (an unknown key, a bad value) is one `ConfigError`."""
    try:
        return LauncherSettings.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(
            exc, LauncherSettings, raw, title="invalid launcher settings (the launcher: block or --launcher-config)"
        )) from None


def sbatch_option(text: str) -> tuple[str, str | bool]:
    """`--key=value` (or `--key value`, or the flag `--key`) as submitit's additional_parameters
    entry: key with underscores (submitit writes `#SBATCH --key=value`), value or True."""
    body = text.strip()
    if not body.startswith("--") or len(body) < 3:
        raise ValueError(f"sbatch option {text!r} must be a long option such as '--exclusive' or "
                         "'--gres=gpu:a100:1'")
    key, sep, value = body[2:].partition("=")
    if not sep:
        key, _, value = body[2:].partition(" ")
    key = key.strip().replace("-", "_")
    if key in RESERVED_SBATCH:
        raise ValueError(f"sbatch option {text!r}: kdlab sets --{key.replace('_', '-')} itself; remove it")
    return key, value.strip() or True


@dataclass(frozen=True)
class Resources:
    """What one plan job gets: `processes` (tasks, one per GPU for DDP), `gpus`, and
    `threads` per process (None: the cluster's default)."""

    processes: int
    gpus: int
    threads: int | None


def job_resources(job: Job, settings: LauncherSettings, threads: int | None = None) -> Resources:
    """A DDP run when the job (or `gpus_per_job`) asks for more than one GPU; a teacher cache is
    built by one process. `cpus_per_job` is divided among the processes (`threads` overrides)."""
    requested = job.gpus if job.gpus > 1 else settings.gpus_per_job
    requested = 1 if requested is None else requested
    processes = 1 if job.kind == "cache" else max(1, requested)
    on_cpu = str(job.config.get("train", {}).get("device", "auto")) == "cpu"
    gpus = 0 if on_cpu else (min(requested, 1) if job.kind == "cache" else requested)
    if threads is None and settings.cpus_per_job is not None:
        if settings.cpus_per_job < processes:
            raise ConfigError(f"cpus_per_job={settings.cpus_per_job} leaves the {processes} processes of "
                              f"{job.label or job.name} without a core each; set cpus_per_job to at least {processes}")
        threads = settings.cpus_per_job // processes
    return Resources(processes, gpus, threads)


def thread_exports(threads: int | None) -> list[str]:
    """Shell lines run before Python starts: the thread count of every OpenMP/BLAS runtime."""
    if threads is None:
        return []
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KDLAB_THREADS")
    return ["export " + " ".join(f"{n}={threads}" for n in names)]


def _submitit() -> Any:
    try:
        import submitit  # lazy: an optional extra (kdlab[slurm]); this module imports without it
    except ImportError:
        raise KDLabError(f"--launcher slurm submits through submitit, which is not installed; {INSTALL}") from None
    return submitit


def make_executor(cluster: str, folder: str | Path, job: Job, settings: LauncherSettings,
                  after: Sequence[str] = (), threads: int | None = None) -> Any:
    """A submitit executor (`cluster`: slurm or local) set up for `job`, waiting (on Slurm) for
    the job ids `after`. One executor per job: submitit cannot unset a dependency once set."""
    submitit = _submitit()
    res = job_resources(job, settings, threads)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    except RuntimeError as exc:  # SlurmExecutor: 'Could not detect "srun"'
        raise KDLabError(f"--launcher slurm: {exc}; run the command on a Slurm login node, or use --launcher "
                         "local") from None
    extra = dict(sbatch_option(text) for text in settings.sbatch)
    if after:
        extra["kill_on_invalid_dep"] = "yes"
    params: dict[str, Any] = {
        "name": f"kdlab:{job.label or Path(job.name).name}"[:100], "timeout_min": settings.time_min, "nodes": 1,
        "tasks_per_node": res.processes, "gpus_per_node": res.gpus or None, "cpus_per_task": res.threads,
        "mem_gb": settings.mem_gb, "stderr_to_stdout": True, "slurm_partition": settings.partition,
        "slurm_account": settings.account, "slurm_qos": settings.qos, "slurm_constraint": settings.constraint,
        "slurm_dependency": "afterok:" + ":".join(after) if after else None,
        "slurm_additional_parameters": extra or None,
        "slurm_setup": thread_exports(res.threads) or None, "local_setup": thread_exports(res.threads) or None,
    }
    executor.update_parameters(**params)
    return executor


class JobRunner:
    """What a submitted job runs: `run_job(job)` in the job's processes. submitit requeues any
    callable with a `checkpoint` method at preemption or timeout (this class does not derive
    from `submitit.helpers.Checkpointable` so that this module imports without submitit)."""

    def __init__(self, job: Job, threads: int | None = None) -> None:
        self.job = job
        self.threads = threads

    def __call__(self) -> str:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        if self.threads:
            import torch  # lazy: loads in the job only, where the thread count is set

            torch.set_num_threads(self.threads)
        # Slurm requeued the job itself (PreemptMode=REQUEUE, a node failure): the pickle it runs
        # again is the first attempt's, so continue the run rather than start it over.
        job = self.job.resumed() if _restarts() else self.job
        distributed = _export_ddp_environment()
        try:
            with preemption_stops_training():
                run_job(job)
        except KDLabError as exc:
            print(f"{ERROR_MARK} {exc}", file=sys.stderr, flush=True)
            raise
        except Exception as exc:
            traceback.print_exc()
            print(f"{ERROR_MARK} {failed_message(exc)}", file=sys.stderr, flush=True)
            raise
        finally:
            if distributed:
                from kdlab.engine.distributed import shutdown_distributed  # lazy: torch.distributed, DDP jobs only

                shutdown_distributed()
        return job.run_dir

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The requeued submission: the same job, continuing the run it saved (never deleting it)."""
        return _submitit().helpers.DelayedSubmission(JobRunner(self.job.resumed(), self.threads))


def _restarts() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _export_ddp_environment() -> bool:
    """In a job of several tasks: the torchrun variables, so that the trainer joins the process
    group. Every task sees all the job's GPUs (the trainer takes cuda:LOCAL_RANK)."""
    submitit = _submitit()
    try:
        tasks = submitit.JobEnvironment().num_tasks
    except Exception:  # noqa: BLE001 - not inside a submitit job (called directly): one process
        return False
    if tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


@contextlib.contextmanager
def preemption_stops_training() -> Iterator[None]:
    """submitit's preemption signal (SIGUSR2) stops the run as Ctrl-C does: SIGINT, which the
    trainer honours at the end of a step with a checkpoint; then submitit's own handler calls
    `checkpoint()` and requeues the job. (submitit's handler alone would exit mid-step, without
    saving the epoch in progress.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    submitit = _submitit()
    usr = submitit.JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(usr)
    caught: list[tuple[int, Any]] = []

    def stop(signum: int, frame: Any) -> None:
        if not caught:
            caught.append((signum, frame))
            os.write(2, b"\nkdlab: preempted or at the time limit: stopping at the end of this step\n")
            os.kill(os.getpid(), signal.SIGINT)

    signal.signal(usr, stop)
    try:
        yield
    except KeyboardInterrupt:
        if not caught:
            raise
        if callable(submitit_handler):
            submitit_handler(*caught[0])  # checkpoint() and requeue; it exits (rank 0 only)
        raise
    finally:
        signal.signal(usr, submitit_handler)


# ---------------------------------------------------------------- submitting and waiting
def submit_plan(plan: Plan, options: ExecOptions, outcomes: dict[str, Outcome]) -> PlanReport:
    """Run the plan's unfinished jobs with submitit (`options.launcher`: slurm or
    submitit-local); `outcomes` holds the finished ones (reused)."""
    _submitit()
    settings = launcher_settings(options.launcher_settings)
    folder = Path(settings.folder) if settings.folder else Path(plan.log_dir or "runs/logs") / "slurm"
    if options.launcher == "slurm":
        return _SlurmPlan(plan, options, settings, folder).run(outcomes)
    return _LocalPlan(plan, options, settings, folder).run(outcomes)


def _fingerprint(job: Job) -> str:
    """What a queued job must match to be waited for instead of submitted again."""
    data = json.dumps({"kind": job.kind, "config": job.config, "run_dir": job.run_dir, "gpus": job.gpus},
                      sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _log_path(handle: Any) -> Path:
    return Path(handle.task(0).paths.stdout)


def _failure(handle: Any) -> str:
    """The error the job printed last, else what Slurm says of it."""
    path = _log_path(handle)
    try:
        marked = ERROR_MARK in path.read_text(errors="replace")
    except OSError:
        marked = False
    if marked:
        return last_error(path)
    state = str(getattr(handle, "state", "") or "").split(" ")[0]
    exc = handle.exception()
    tail = str(exc).strip().splitlines()[-1] if exc is not None and str(exc).strip() else ""
    return (f"job {handle.job_id} ended {state}" + (f": {tail}" if tail else ""))[:500]


class _Waiter:
    """Polls the submitted jobs; records each finished one as done or failed (its dependents skipped)."""

    poll_s = 1.0

    def __init__(self, plan: Plan, options: ExecOptions) -> None:
        self.plan = plan
        self.status = StatusLine(plan, options.status)
        self.handles: dict[str, Any] = {}
        self.started: dict[str, float] = {}

    def job(self, name: str) -> Job:
        return next(j for j in self.plan.jobs if j.name == name)

    def collect(self, outcomes: dict[str, Outcome]) -> None:
        """Record the jobs that ended since the last call."""
        for name, handle in list(self.handles.items()):
            if name in outcomes or name not in self.handles:  # skipped meanwhile: its dependency failed
                self.handles.pop(name, None)
                continue
            if name not in self.started and str(handle.state).upper().startswith("RUNNING"):
                self.started[name] = time.monotonic()
            if not handle.done():
                continue
            del self.handles[name]
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            job = self.job(name)
            if handle.exception() is None:
                outcomes[name] = Outcome(job, "done", seconds=seconds, log=str(_log_path(handle)))
            else:
                outcomes[name] = Outcome(job, "failed", _failure(handle), seconds, str(_log_path(handle)))
                for dep in self.plan.dependents(name):
                    if dep.name in self.handles:
                        self.handles.pop(dep.name).cancel(check=False)
                skip_dependents(self.plan, name, outcomes)
            self.status.update(outcomes, len(self.handles), max(1, len(self.handles)), outcomes[name])


class _SlurmPlan(_Waiter):
    poll_s = 10.0

    def __init__(self, plan: Plan, options: ExecOptions, settings: LauncherSettings, folder: Path) -> None:
        super().__init__(plan, options)
        self.options, self.settings, self.folder = options, settings, folder
        self.record_path = folder / RECORD

    def run(self, outcomes: dict[str, Outcome]) -> PlanReport:
        if shutil.which("sbatch") is None:
            raise KDLabError("--launcher slurm submits with Slurm's sbatch, which is not on this machine's PATH; "
                             "run the command on the cluster's login node (or use --launcher local)")
        try:
            adopted = self._submit(outcomes)
            if self.handles:
                ids = ", ".join(h.job_id for h in self.handles.values())
                earlier = f", {len(adopted)} of them queued by an earlier command" if adopted else ""
                log.info("%s: Slurm jobs %s%s; logs in %s", self.plan.name, ids, earlier, self.folder)
            if not self.settings.wait:
                for name, handle in self.handles.items():
                    note = f"Slurm job {handle.job_id}" + (" (queued earlier)" if name in adopted else "")
                    outcomes[name] = Outcome(self.job(name), "submitted", note, log=str(_log_path(handle)))
                return PlanReport(self.plan, outcomes)
            self.status.update(outcomes, len(self.handles), max(1, len(self.handles)))
            while self.handles:
                self.collect(outcomes)
                if self.handles:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            self.status.close()
            if self.handles:
                ids = ", ".join(h.job_id for h in self.handles.values())
                print(f"\n{self.plan.name}: stopped waiting; the Slurm jobs {ids} stay queued (scancel them to stop "
                      "them). Run the same command again to wait for them and collect their results.",
                      file=sys.stderr)
            raise
        finally:
            self.status.close()
        return PlanReport(self.plan, outcomes)

    def _submit(self, outcomes: dict[str, Outcome]) -> set[str]:
        """Submit every job left, in plan order (a job's dependencies have their ids first); a job
        an earlier command queued is waited for, not submitted again. Returns the names of those."""
        submitit = _submitit()
        record = self._read_record()
        if record:  # keep only the jobs still in the queue
            live = self._queued_ids()
            record = {name: r for name, r in record.items() if isinstance(r, dict) and r.get("id") in live}
        adopted: set[str] = set()
        for job in self.plan.jobs:
            if job.name in outcomes:
                continue
            lost = [a for a in job.after if a in outcomes and outcomes[a].status not in ("done", "reused")]
            if lost:  # its dependency could not be submitted
                skip_dependents(self.plan, lost[0], outcomes)
                continue
            old = record.get(job.name, {})
            if old and old.get("fingerprint") == _fingerprint(job):
                self.handles[job.name] = submitit.SlurmJob(folder=self.folder, job_id=old["id"],
                                                           tasks=list(range(old.get("tasks", 1))))
                adopted.add(job.name)
                continue
            after = [self.handles[a].job_id for a in job.after if a in self.handles]
            threads = job_resources(job, self.settings, self.options.threads).threads
            executor = make_executor("slurm", self.folder, job, self.settings, after, threads)
            try:
                # Submitted from inside a Slurm job: without its SLURM_* variables, which sbatch would inherit.
                with submitit.helpers.clean_env() if os.environ.get("SLURM_JOB_ID") else contextlib.nullcontext():
                    handle = executor.submit(JobRunner(job, threads))
            except Exception as exc:  # noqa: BLE001 - sbatch refused it (FailedJobError holds its stderr)
                why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                if not self.handles:
                    raise KDLabError(f"sbatch refused the job {job.label or job.name}: {why}; check the launcher "
                                     "settings (partition, account, qos, time_min, sbatch)") from None
                outcomes[job.name] = Outcome(job, "failed", f"sbatch: {why}")
                skip_dependents(self.plan, job.name, outcomes)
                continue
            self.handles[job.name] = handle
            record[job.name] = {"id": handle.job_id, "tasks": handle.num_tasks, "fingerprint": _fingerprint(job)}
            self._write_record(record)
        return adopted

    def _read_record(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_record(self, record: dict[str, Any]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(self.record_path)
        except OSError as exc:
            log.warning("cannot write %s (%s): a second command will not find these jobs in the queue",
                        self.record_path, exc.strerror)

    def _queued_ids(self) -> set[str]:
        """The ids of this user's jobs still in the queue (pending, running, requeued)."""
        try:
            out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("squeue failed (%s): jobs queued by an earlier command are submitted again", exc)
            return set()
        return {line.strip() for line in out.splitlines() if line.strip()}


class _LocalPlan(_Waiter):
    """submitit's local executor: each job a local process group (`options.jobs` at once), started
    once its dependencies have finished."""

    poll_s = 0.5

    def __init__(self, plan: Plan, options: ExecOptions, settings: LauncherSettings, folder: Path) -> None:
        super().__init__(plan, options)
        self.options, self.settings, self.folder = options, settings, folder

    def run(self, outcomes: dict[str, Outcome]) -> PlanReport:
        slots = self.options.jobs
        threads = self.options.threads or (None if self.settings.cpus_per_job else threads_per_job(slots))
        try:
            while True:
                for job in ready_jobs(self.plan, outcomes, set(self.handles)):
                    if len(self.handles) >= slots:
                        break
                    res = job_resources(job, self.settings, threads)
                    executor = make_executor("local", self.folder, job, self.settings, threads=res.threads)
                    self.handles[job.name] = executor.submit(JobRunner(job, res.threads))
                    self.status.update(outcomes, len(self.handles), slots)
                if not self.handles:
                    break
                time.sleep(self.poll_s)
                self.collect(outcomes)
        except KeyboardInterrupt:
            for name in list(self.handles):  # the jobs got the terminal's Ctrl-C too: they save and stop
                outcomes[name] = Outcome(self.job(name), "interrupted", "stopped by Ctrl-C")
            raise
        finally:
            self.status.close()
        return PlanReport(self.plan, outcomes)


__all__ = ["JobRunner", "LauncherSettings", "Resources", "job_resources", "launcher_settings", "make_executor",
           "preemption_stops_training", "sbatch_option", "submit_plan", "thread_exports"]
