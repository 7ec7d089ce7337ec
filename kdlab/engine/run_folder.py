"""A run folder, `<output_dir>/<name>/`: what it holds, and the guard that nothing in it is lost.

Every command that trains (`kdlab train`, `--seeds`, `generations`, `reproduce`) and the
`Trainer` itself go through `RunFolder.claim` before writing anything: a folder that holds a
run (a checkpoint, or a finished run's `result.json`) is continued only with `resume`,
replaced only with `overwrite`, and otherwise refused with one message naming the folder and
the three ways on. Readers (`kdlab results`, the generations report, `kdlab reproduce`) read
`result.json` and `metrics.jsonl` through the same class.

Files of a run folder (written by the trainer and its callbacks):

    config.yaml     the resolved config           metrics.jsonl   one JSON line per epoch
    last.pt         checkpoint of the last epoch  best.pt         checkpoint of the best epoch
    epoch_<N>.pt    with train.save_every         result.json     written once the run finished
    tb/             TensorBoard events            (and a method's or the data's own records)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlab.config.compare import run_differences
from kdlab.config.loader import config_to_dict, validate_config
from kdlab.errors import KDLabError

log = logging.getLogger("kdlab")

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = ("last.pt", "best.pt")
#: Keys every result.json has, whatever the task (its metric keys differ: last_top1, ...).
RESULT_REQUIRED = ("epochs", "best_epoch")


class RunFolderTaken(KDLabError):
    """Training would write into a folder that already holds a run."""


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK unset: a single process). Only it deletes or writes run files."""
    return os.environ.get("RANK", "0") == "0"


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

    def checkpoint(self, which: Literal["last", "best"] = "last") -> Path:
        """`last.pt` or `best.pt` of this run (whether or not it exists)."""
        return self.path / f"{which}.pt"

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
        if saved is None:
            return None
        try:
            return config_to_dict(validate_config(saved))
        except KDLabError:
            return saved

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
                retry: str = "") -> str | None:
        """Why `claim` with these flags would refuse this folder (None when it would not); reads only."""
        if resume and overwrite:
            return (f"--resume and --overwrite contradict each other: --resume continues the {what} in "
                    f"{self.path}, --overwrite deletes it; pass one")
        if resume or overwrite or not self.holds_run():
            return None
        return taken_message(self, what, retry)

    def claim(self, *, resume: bool | str = False, overwrite: bool = False, is_main: bool | None = None,
              what: str = "run", retry: str = "") -> None:
        """Make training into this folder lose nothing; call it before writing anything here.

        - The folder holds no run (no checkpoint, no result.json): nothing to protect.
        - `resume` (True or a checkpoint path): the run here continues (a finished one stays finished).
        - `overwrite`: the old run's files (if any) are deleted now (`clear`; by the main process only:
          `is_main`, default: RANK unset or 0).
        - Otherwise `RunFolderTaken`, naming the folder and the three ways on.

        Calling it again is harmless: after `overwrite` the folder holds no run any more, and
        `resume` changes nothing. `what` names the run in the message ("teacher run"); `retry`
        is the command to show, e.g. "kdlab train CONFIG".
        """
        problem = self.refusal(resume=resume, overwrite=overwrite, what=what, retry=retry)
        if problem:
            raise RunFolderTaken(problem)
        if overwrite and (is_main_process() if is_main is None else is_main):
            removed = self.clear()  # also the leftovers of a run stopped in its first epoch
            if removed:
                log.warning("--overwrite: deleted the earlier %s in %s (%d files)", what, self.path, len(removed))

    def clear(self) -> list[Path]:
        """Delete this run's files: every file directly in the folder and its `tb/` folder.
        Sub-folders other than `tb/` are kept (kdlab writes none; they may be other runs).
        Returns what was deleted."""
        removed: list[Path] = []
        if not self.path.is_dir():
            return removed
        for entry in sorted(self.path.iterdir()):
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        tb = self.path / "tb"
        if tb.is_dir() and not tb.is_symlink():
            removed += [p for p in tb.rglob("*") if p.is_file()]
            shutil.rmtree(tb)
        return removed

    # ------------------------------------------------------------------ writers
    def check_writable(self) -> None:
        """Fail before training, not after the first epoch, when the folder cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".kdlab-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise KDLabError(
                f"output folder {str(self.path)!r} cannot be written ({exc.strerror or exc}); "
                "set output_dir=<a writable folder> on the command line or in the config"
            ) from None

    def write_result(self, result: dict[str, Any]) -> None:
        """Write `result.json` atomically (a temporary file, then a rename): a run killed while
        writing it leaves no half-written file that could pass for a finished run."""
        missing = [k for k in RESULT_REQUIRED if k not in result]
        if missing:
            raise ValueError(f"result.json needs the keys {', '.join(RESULT_REQUIRED)}; missing {', '.join(missing)}")
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{RESULT_FILE}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, self.result_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def taken_message(folder: RunFolder, what: str = "run", retry: str = "", holds: str | None = None) -> str:
    """The one message of a refused run folder: the folder, what it holds (`holds`, default
    `folder.describe()`), and the three ways on."""
    cmd = retry or "the same command"
    return (
        f"{folder.path} already holds a {what} ({holds or folder.describe()}); kdlab does not write over it. "
        f"Either continue it: {cmd} --resume (a finished run stays finished); or train into another "
        f"folder: name=<new name> (or output_dir=<folder>); or replace it: {cmd} --overwrite "
        "(deletes its files first)"
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


__all__ = ["CHECKPOINTS", "RESULT_REQUIRED", "RunFolder", "RunFolderTaken", "claim_cache_folder",
           "is_main_process", "taken_message"]
