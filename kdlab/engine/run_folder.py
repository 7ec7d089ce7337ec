"""A run folder, `<output_dir>/<name>/`: what it holds, and the guard that nothing in it is lost.

Every command that trains (`kdlab train`, `--seeds`, `generations`, `reproduce`, the demo) goes
through `RunFolder.claim` once before writing anything (`kdlab.engine.launch`, which hands the
claimed folder to the `Trainer`; a `Trainer` given no folder claims its own): a folder that holds a
run (a checkpoint, or a finished run's `result.json`) is continued only with `resume`,
replaced only with `overwrite`, and otherwise refused with one message naming the folder and
the three ways on. Readers (`kdlab results`, the generations report, `kdlab reproduce`) read
`result.json` and `metrics.jsonl` through the same class.

Files of a run folder (written through this class by the trainer and its callbacks, except the
two records, written by their own modules under the names they export; `run_files()` lists them all,
and `--overwrite` deletes these and nothing else):

    config.yaml     the config the run started with (never rewritten by --resume)
    metrics.jsonl   one JSON line per epoch       result.json     written once the run finished
    last.pt         checkpoint of the last epoch  best.pt         checkpoint of the best epoch
    epoch_<N>.pt    with train.save_every         tb/events.*     TensorBoard events
    label_noise.json, noisy_labels.npy            the label-noise record (kdlab.data.noise_record)
    nckd_split.json, nckd_split_indices.npy       dkd_split's split (kdlab.methods.dkd_split)
    .kdlab.lock     held by the process writing the run (removed when it ends)

One writer at a time: `claim` takes an exclusive `fcntl.flock` on `.kdlab.lock`, held until the
run ends (`release`) or its process dies (the kernel drops the lock then, so a killed run never
leaves a stale lock); a second writer is refused with the holder's pid, host and command.

`--resume` continues only the same experiment (`kdlab.schema.compare`: what may differ is where
the run is written and the `VOLATILE` settings: where the data lives, how fast it runs, how it is
logged). A longer schedule (`train.epochs`, `train.iterations`) is another experiment: it is
refused with the way on, a new run initialised from this one (`model.checkpoint=<run>/last.pt`).
"""
from __future__ import annotations

import atexit
import fcntl
import fnmatch
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlab.schema.compare import run_differences
from kdlab.config.loader import config_to_dict, dump_config, validate_config
from kdlab.errors import ConfigError, KDLabError

log = logging.getLogger("kdlab")

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".kdlab.lock"
WRITE_PROBE = ".kdlab-write-test"
CHECKPOINTS = ("last.pt", "best.pt")


def run_files() -> tuple[str, ...]:
    """Every file kdlab writes directly in a run folder (glob patterns), and `.<file>.*.tmp`, the
    temporary files of the atomic writes. `clear` deletes these and nothing else."""
    # lazy: the records' writers (kdlab.data, kdlab.methods) import torch, which reading a run
    # folder does not need (kdlab results starts without it)
    from kdlab.data.noise_record import LABELS_NAME, RECORD_NAME
    from kdlab.methods.dkd_split import SPLIT_INDICES, SPLIT_RECORD

    files = (CONFIG_FILE, METRICS_FILE, RESULT_FILE, *CHECKPOINTS, "epoch_[0-9]*.pt", RECORD_NAME, LABELS_NAME,
             SPLIT_RECORD, SPLIT_INDICES, WRITE_PROBE)
    return files + tuple(f".{name}.*.tmp" for name in files)


#: TensorBoard's event files, in the run's `tb/` folder.
TB_DIR, TB_FILES = "tb", ("events.out.tfevents.*",)
#: Keys of a result.json, whatever the task (its metric keys differ: last_top1, ...).
RESULT_REQUIRED = ("epochs", "best_epoch")
#: What makes a resumed run longer or shorter: named on their own in the refusal.
SCHEDULE_LENGTH = ("train.epochs", "train.iterations")


class RunFolderTaken(KDLabError):
    """Training would write into a folder that already holds a run."""


class RunFolderBusy(RunFolderTaken):
    """Another process is writing the run folder now."""


class ResumeMismatch(ConfigError):
    """`--resume` with a config that is another experiment than the saved run."""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0644 under the usual 022):
    what the atomic writes give their files (`tempfile.mkstemp` makes them 0600, which would hide
    a run's checkpoints from the colleagues who may read its other files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):  # not Linux: the umask can only be read by setting it
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@dataclass
class _Held:
    """A run folder's lock held by this process: the open lock file, and the folders `lock`
    created (removed again by `release(abandon=True)` when they are still empty)."""

    fd: int
    created: list[Path] = field(default_factory=list)


#: Locks this process holds, by resolved folder: claiming a held folder again is a no-op.
_HELD: dict[Path, _Held] = {}
#: Folders created for runs that failed before they started, not yet removed (not yet empty).
_CREATED: list[Path] = []


@atexit.register
def _release_at_exit() -> None:
    """A process that ends normally removes its lock files (a killed one leaves them: harmless,
    the kernel has dropped their locks)."""
    for path in list(_HELD):
        RunFolder(path).release()


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK unset: a single process). Only it deletes or writes run files."""
    return os.environ.get("RANK", "0") == "0"


def as_experiment(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a run's config.yaml, a checkpoint's `config`) as the current schema reads
    it (defaults of keys added since the run was trained filled in), so that comparing it with a
    config of today is fair; the raw dict when it no longer validates."""
    try:
        return config_to_dict(validate_config(saved))
    except KDLabError:
        return saved


class RunFolder:
    """The folder of one run. Cheap to make: nothing is read until asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: Any) -> "RunFolder":
        """The folder `cfg` trains into: `<cfg.output_dir>/<cfg.name>`."""
        return cls(Path(cfg.output_dir) / cfg.name)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ files
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def result_path(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tb_dir(self) -> Path:
        """TensorBoard's folder."""
        return self.path / TB_DIR

    def checkpoint(self, which: Literal["last", "best"] | int = "last") -> Path:
        """`last.pt` or `best.pt` of this run, or `epoch_<N>.pt` for an int (whether or not it exists)."""
        return self.path / (f"epoch_{which}.pt" if isinstance(which, int) else f"{which}.pt")

    def teacher_checkpoint(self, named: str | None) -> Path:
        """The checkpoint of this teacher run that a student loads: `last.pt` when the student's
        config names a last.pt (DKD/KD distil from the final epoch, as the DKD authors do), else
        `best.pt` (ReviewKD's official scripts; also when it names neither). Used by `reproduce`
        and `sweep`, which train the teacher themselves."""
        last = self.checkpoint("last")
        return last if Path(named or "").name == last.name else self.checkpoint("best")

    def checkpoints(self) -> list[Path]:
        """The checkpoints that exist (`last.pt`, `best.pt`, `epoch_<N>.pt`)."""
        if not self.path.is_dir():
            return []
        named = [self.path / n for n in CHECKPOINTS if (self.path / n).is_file()]
        return named + sorted(self.path.glob("epoch_*.pt"))

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints())

    # ------------------------------------------------------------------ state
    def is_finished(self) -> bool:
        """True when `result.json` was written and is complete (the run reached its last epoch)."""
        return self._result_or_none() is not None

    def holds_run(self) -> bool:
        """A checkpoint or a finished run's result: something training here would destroy.
        (A folder with neither holds at most a run stopped in its first epoch.)"""
        return self.has_checkpoint() or self.result_path.is_file()

    def describe(self) -> str:
        """What the folder holds, for messages: 'last.pt, best.pt; finished'."""
        names = [p.name for p in self.checkpoints()]
        if len(names) > 3:
            names = names[:3] + [f"{len(names) - 3} more"]
        state = "finished" if self.is_finished() else "not finished"
        return f"{', '.join(names) or 'no checkpoint'}; {state}"

    # ------------------------------------------------------------------ readers
    def _result_or_none(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.result_path.read_text())
        except (OSError, ValueError):  # missing, unreadable, truncated or not UTF-8
            return None
        if not isinstance(data, dict) or any(k not in data for k in RESULT_REQUIRED):
            return None
        return data

    def read_result(self) -> dict[str, Any]:
        """The finished run's `result.json`; a `KDLabError` when it is missing or incomplete."""
        data = self._result_or_none()
        if data is None:
            state = "is incomplete" if self.result_path.exists() else "does not exist"
            raise KDLabError(f"{self.result_path} {state}: {self.path} holds no finished run; "
                             "finish it with 'kdlab train CONFIG --resume' (or train it)")
        return data

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch rows of `metrics.jsonl` ([] when there is none). A torn last line (a run
        killed while writing it) is skipped; a damaged line elsewhere is a `KDLabError`."""
        try:
            lines = self.metrics_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise KDLabError(f"{self.metrics_path} cannot be read ({exc})") from None
        lines = [line for line in lines if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if n == len(lines):
                    break
                raise KDLabError(f"{self.metrics_path}, line {n}: not a JSON row; the log is damaged") from None
        return rows

    def last_metric(self, key: str) -> float | None:
        """`key` of the last epoch's row of metrics.jsonl, or None."""
        rows = self.read_metrics()
        value = rows[-1].get(key) if rows else None
        return float(value) if isinstance(value, (int, float)) else None

    def saved_config(self) -> dict[str, Any] | None:
        """The raw `config.yaml` the run was trained with (None when there is none or it is unreadable)."""
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def experiment(self) -> dict[str, Any] | None:
        """The saved config as the current schema reads it (defaults of keys added since the run
        was trained filled in), so that comparing it with a config of today is fair; the raw file
        when it no longer validates."""
        saved = self.saved_config()
        return None if saved is None else as_experiment(saved)

    # ------------------------------------------------------------------ same experiment?
    def differences(self, cfg: Any) -> list[str]:
        """Why the run saved here is another experiment than `cfg` (an `ExperimentConfig` or its
        dict), as 'key: saved -> wanted' lines; [] when it is the same or nothing is saved."""
        saved = self.experiment()
        if saved is None:
            return []
        wanted = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
        return run_differences(saved, wanted)

    # ------------------------------------------------------------------ the guard
    def refusal(self, *, resume: bool | str = False, overwrite: bool = False, what: str = "run",
                retry: str = "", is_main: bool | None = None) -> str | None:
        """Why `claim` with these flags would refuse this folder (None when it would not); reads only.
        Another process writing it is the main process's concern (`is_main`, default: RANK unset
        or 0): under torchrun, rank 0 holds the lock the other ranks would see."""
        if resume and overwrite:
            return (f"--resume and --overwrite contradict each other: --resume continues the {what} in "
                    f"{self.path}, --overwrite deletes it; pass one")
        busy = self.busy() if (is_main_process() if is_main is None else is_main) else None
        if busy:
            return busy
        if resume or overwrite or not self.holds_run():
            return None
        return taken_message(self, what, retry)

    def resume_refusal(self, cfg: Any, saved: dict[str, Any] | None = None, source: str | None = None) -> str | None:
        """Why continuing the run saved here with `cfg` would train another experiment (None when
        it would not): the differing keys and the ways on. `saved`: the saved config to compare
        (default: this folder's config.yaml, read as today's schema reads it); `source` names it."""
        saved = self.experiment() if saved is None else saved
        if saved is None:
            return None
        wanted = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
        diffs = run_differences(saved, wanted)
        if not diffs:
            return None
        source = source or str(self.config_path)
        longer = [d for d in diffs if d.split(":")[0] in SCHEDULE_LENGTH]
        extend = (f" A run's length is part of its schedule (its learning rate was planned for the saved "
                  f"length), so it does not change on resume; to train longer, start a new run from "
                  f"its weights: name=<new name> model.checkpoint={self.checkpoint('last')}.") if longer else ""
        return (f"--resume would continue {self.path} with another experiment than the one it trained "
                f"({source} -> this config): {'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. On "
                "resume only where the run is written and the settings of kdlab.schema.compare.VOLATILE (data "
                f"location, workers, device, logging, ...) may change.{extend} Either continue the run as it "
                f"was: kdlab train {self.config_path} --resume; or train this config into another folder: "
                "name=<new name>; or replace the run: --overwrite")

    def claim(self, *, resume: bool | str = False, overwrite: bool = False, is_main: bool | None = None,
              what: str = "run", retry: str = "", cfg: Any = None) -> None:
        """Make training into this folder lose nothing; call it before writing anything here.

        - Another process writes the folder now: `RunFolderBusy`, naming it.
        - The folder holds no run (no checkpoint, no result.json): nothing to protect.
        - `resume` (True or a checkpoint path): the run here continues (a finished one stays
          finished); with `cfg`, only when it is the same experiment (`ResumeMismatch` otherwise).
        - `overwrite`: the old run's files (`run_files()`) are deleted now (`clear`).
        - Otherwise `RunFolderTaken`, naming the folder and the three ways on.

        The main process (`is_main`, default: RANK unset or 0) then holds the folder's lock until
        `release` or its end; only it deletes anything. Calling it again is harmless: the lock is
        held already, after `overwrite` the folder holds no run any more, and `resume` changes
        nothing. `what` names the run in the message ("teacher run"); `retry` is the command to
        show, e.g. "kdlab train CONFIG lr=0.1".
        """
        main = is_main_process() if is_main is None else is_main
        for attempt in range(2):  # checked before locking (a refused folder is not touched) and after
            problem = self.refusal(resume=resume, overwrite=overwrite, what=what, retry=retry, is_main=main)
            if problem:
                raise RunFolderBusy(problem) if problem.startswith(BUSY) else RunFolderTaken(problem)
            if resume and cfg is not None and self.holds_run():
                problem = self.resume_refusal(cfg)
                if problem:
                    raise ResumeMismatch(problem)
            if attempt == 0 and main:
                self.lock()
        if overwrite and main:
            removed = self.clear()  # also the leftovers of a run stopped in its first epoch
            if removed:
                log.warning("--overwrite: deleted the earlier %s in %s (%d files)", what, self.path, len(removed))

    def clear(self) -> list[Path]:
        """Delete this run's files: the `run_files()` directly in the folder (and their temporary
        files) and TensorBoard's event files in `tb/` (removed when that leaves it empty). What
        kdlab does not write (a user's notes, a sub-folder, another run) is kept. Returns what
        was deleted."""
        removed: list[Path] = []
        if not self.path.is_dir():
            return removed
        files = run_files()
        for entry in sorted(self.path.iterdir()):
            if _matches(entry.name, files) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
                removed.append(entry)
        tb = self.path / TB_DIR
        if tb.is_dir() and not tb.is_symlink():
            for entry in sorted(tb.iterdir()):
                if _matches(entry.name, TB_FILES) and entry.is_file():
                    entry.unlink()
                    removed.append(entry)
            if not any(tb.iterdir()):
                tb.rmdir()
        return removed

    # ------------------------------------------------------------------ one writer
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def busy(self) -> str | None:
        """Who writes this folder now, as the message for a second writer; None when no other
        process holds its lock. Reads only (creates nothing)."""
        if self.path.resolve() in _HELD:
            return None
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:  # no lock file: nobody has ever locked it, or the last writer ended
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return busy_message(self, os.read(fd, 4096))
        finally:
            os.close(fd)  # also drops the shared lock
        return None

    def lock(self) -> None:
        """Hold the folder's exclusive lock (creating the folder) until `release` or the end of
        this process; `RunFolderBusy` when another process holds it."""
        key = self.path.resolve()
        if key in _HELD:
            return
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    text = os.read(fd, 4096)
                    os.close(fd)
                    raise RunFolderBusy(busy_message(self, text)) from None
                # The previous holder may have removed the file between our open and flock:
                # then the lock is on a file nobody else will open; take the one on disk.
                try:
                    if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
        except OSError as exc:
            raise self._unwritable(exc) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        _HELD[key] = _Held(fd, created)

    def release(self, *, abandon: bool = False) -> None:
        """Give up the lock (a no-op when not held). `abandon`: the run never started (it failed
        before writing anything), so the folders `lock` created are removed again if empty."""
        held = _HELD.pop(self.path.resolve(), None)
        if held is None:
            return
        try:
            self.lock_path.unlink()  # while still locked: nobody can take the file being removed
        except OSError:
            pass
        os.close(held.fd)
        if abandon:
            _CREATED.extend(held.created)
            # Deepest first, and every folder this process created for a run that never started:
            # the seed folders of `--seeds` share the output_dir they created.
            for folder in sorted(set(_CREATED), key=lambda p: len(p.parts), reverse=True):
                try:
                    folder.rmdir()
                    _CREATED[:] = [p for p in _CREATED if p != folder]
                except OSError:  # not empty: it holds something after all; keep it
                    pass

    # ------------------------------------------------------------------ writers
    def check_writable(self) -> None:
        """Fail before training, not after the first epoch, when the folder cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / WRITE_PROBE
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> KDLabError:
        return KDLabError(f"output folder {str(self.path)!r} cannot be written ({exc.strerror or exc}); "
                          "set output_dir=<a writable folder> on the command line or in the config")

    def write_config(self, cfg: Any) -> None:
        """Write `config.yaml`: the resolved config the run starts with."""
        dump_config(cfg, self.config_path)

    def reset_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite `metrics.jsonl` to `rows` (a resumed run keeps the epochs before its checkpoint)."""
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Add an epoch's row to `metrics.jsonl`."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, checkpoint: Any, which: Literal["last", "best"] | int) -> Path:
        """Write `checkpoint` (anything with `.save(path)`: a `Checkpoint`, atomically) as
        `which` (see `checkpoint`); returns its path."""
        path = self.checkpoint(which)
        checkpoint.save(path)
        return path

    def write_result(self, result: dict[str, Any]) -> None:
        """Write `result.json` atomically (a temporary file, then a rename): a run killed while
        writing it leaves no half-written file that could pass for a finished run."""
        missing = [k for k in RESULT_REQUIRED if k not in result]
        if missing:
            raise ValueError(f"result.json needs the keys {', '.join(RESULT_REQUIRED)}; missing {', '.join(missing)}")
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{RESULT_FILE}.", suffix=".tmp", dir=self.path)
        try:
            os.fchmod(fd, file_mode())
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, self.result_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


BUSY = "another kdlab process"


def busy_message(folder: RunFolder, holder: bytes) -> str:
    """The message of a folder another process writes, from what its lock file says of it."""
    try:
        info = json.loads(holder.decode())
        who = f"pid {info['pid']} on host {info['host']}, since {info['since']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        who = "its pid not recorded yet"
    return (f"{BUSY} is writing {folder.path} now ({who}); two runs in one folder would mix their files. "
            "Wait for it to end (or stop it), or train into another folder: name=<new name> (or output_dir=<folder>)")


def taken_message(folder: RunFolder, what: str = "run", retry: str = "", holds: str | None = None) -> str:
    """The one message of a refused run folder: the folder, what it holds (`holds`, default
    `folder.describe()`), and the three ways on."""
    cmd = retry or "the same command"
    return (
        f"{folder.path} already holds a {what} ({holds or folder.describe()}); kdlab does not write over it. "
        f"Either continue it: {cmd} --resume (a finished run stays finished); or train into another "
        f"folder: name=<new name> (or output_dir=<folder>); or replace it: {cmd} --overwrite "
        "(deletes the files kdlab wrote for it first)"
    )


def claim_cache_folder(path: str | Path, *, overwrite: bool, retry: str = "kdlab cache-teacher CONFIG") -> None:
    """The guard for a folder that is not a run but an output of its own (the teacher cache): an
    existing one is refused unless `overwrite` (the writer replaces it only once the new one is
    complete, so nothing is deleted here)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RunFolderTaken(
            f"{path} already exists; kdlab does not write over it. Either use it as it is "
            f"(teacher.cache={path}); or write elsewhere: --out PATH (or teacher.cache=PATH); or "
            f"rebuild it: {retry} --overwrite (replaced once the new cache is complete)"
        )


__all__ = ["CHECKPOINTS", "RESULT_REQUIRED", "ResumeMismatch", "RunFolder", "RunFolderBusy",
           "RunFolderTaken", "as_experiment", "busy_message", "claim_cache_folder", "file_mode", "is_main_process", "run_files", "taken_message"]
