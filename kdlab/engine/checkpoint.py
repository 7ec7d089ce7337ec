"""Checkpoints: one versioned type, atomic writes, safe loads, and models rebuilt from them.

A `Checkpoint` holds the trained model (never a frozen teacher), the method's extras,
optimizer/scheduler/scaler state, the epoch, the best-epoch metrics, RNG states, per-callback
state and the resolved config. On disk it is a plain dict (`to_dict`) saved with `torch.save`
and read with `weights_only=True`, so loading never executes code from the file. Writes go
to a temporary file in the same folder followed by `os.replace`, so a crash during a save
leaves the previous checkpoint intact.

Format versions (the dict's `version`; `format` is always "kdlab-checkpoint"):

- 1: written by kdlab before the `Checkpoint` type: the best metrics were two keys,
  `best_top1` and `best_top5`, and there was no per-callback state. Hand-built files of that
  time may lack `version` and most keys; they read as version 1 with defaults.
- 2: `best` is a dict of best-epoch metrics (`{"top1", "top5"}` for classification,
  `{"bbox_ap"}` for detection) and `callbacks` holds each callback's state; the run's position
  (epoch, best, history, ...) and every component (optimizer, scheduler, ...) are keys of their own.
- 3 (`CURRENT_VERSION`): the model record and weights, method, config and class names, and
  `state`: `{name: component.state_dict()}` of the run's self-saving components
  (`kdlab.engine.state`): "train" (the `TrainState`), "extras", "optimizer", "scheduler",
  "scaler", "rng", "callback/<key>". The checkpoint knows none of their fields.

`Checkpoint.load` reads all three (versions 1 and 2 are upgraded into `state` as they load); a
file of a newer or unknown version is refused with one message naming both versions, never
half-read.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdlab.engine.run_folder import file_mode
from kdlab.engine.state import TrainState, callback_component
from kdlab.errors import CheckpointError
from kdlab.models import create_model
from kdlab.models.weights import UnreadableTorchFile, access_problem, describe_mismatch, read_torch_file

FORMAT = "kdlab-checkpoint"
CURRENT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

#: Said of any file that is not a kdlab checkpoint: where checkpoints come from, and where
#: other weight files go instead.
NOT_A_CHECKPOINT_FIX = (
    "model.checkpoint (and teacher.checkpoint, kdlab eval) take checkpoints written by 'kdlab train' "
    "(<output_dir>/<name>/best.pt or last.pt); for weights saved by another program, such as a "
    "torchvision or timm state dict, set model.weights=PATH (teacher.weights=PATH for a teacher) instead"
)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` via a temporary file + rename (atomic on POSIX). A failed write
    (a full disk, a read-only folder) leaves `path` as it was and raises an `OSError` whose
    `filename` is `path` (not the temporary file, nor None as a full disk's error has)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    try:
        os.fchmod(fd, file_mode())  # readable like the run's other files, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # OSError(errno, ...) is the errno's subclass again (PermissionError, ...)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


@dataclass
class ModelRecord:
    """What rebuilds the checkpointed model: `create_model(name, num_classes, **kwargs)`."""

    name: str
    num_classes: int
    kwargs: dict = field(default_factory=dict)


#: Version-1 and -2 fields that are now entries of `state` (`TrainState` fields under "train").
_TRAIN_FIELDS = ("epoch", "best", "best_epoch", "history", "skipped_batches", "partial")
_COMPONENT_FIELDS = {"extra_state": "extras", "optimizer": "optimizer", "scheduler": "scheduler",
                     "scaler": "scaler", "rng": "rng"}
#: The top-level keys of a version-3 file besides `format` and `version`.
_V3_KEYS = ("model", "model_state", "method", "config", "class_names", "state")


def _state_from_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The `state` of a checkpoint given as the fields of versions 1 and 2 (popped from `values`):
    the run's position under "train", the other components under their names."""
    state: dict[str, Any] = {}
    train = {k: values.pop(k) for k in _TRAIN_FIELDS if k in values}
    if train:
        state["train"] = train
    for old, name in _COMPONENT_FIELDS.items():
        value = values.pop(old, None)
        if value is not None:
            state[name] = value
    for key, value in (values.pop("callbacks", None) or {}).items():
        state[callback_component(key)] = value
    return state


@dataclass
class Checkpoint:
    """A kdlab checkpoint (see the module docstring for the on-disk versions).

    `state` holds the run's components by name (`kdlab.engine.state`): "train" (`TrainState`),
    "extras", "optimizer", "scheduler", "scaler", "rng", "callback/<key>"; the properties below
    read the usual ones. Tests and scripts build one with `Checkpoint.for_model(model, name,
    num_classes)`.
    """

    model: ModelRecord
    model_state: dict[str, Tensor]
    method: str = "vanilla"
    config: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    #: The format version the checkpoint was read from (1 or 2 for an upgraded old file);
    #: `to_dict` always writes `CURRENT_VERSION`.
    version: int = CURRENT_VERSION

    # Version 1 keys that became `best` in version 2.
    _V1_BEST: ClassVar[dict[str, str]] = {"best_top1": "top1", "best_top5": "top5"}

    # ------------------------------------------------------------------ building
    @classmethod
    def for_model(cls, model: nn.Module, name: str, num_classes: int, kwargs: dict | None = None,
                  **values: Any) -> "Checkpoint":
        """A checkpoint of `model` as `create_model(name, num_classes, **kwargs)` rebuilds it;
        other fields by keyword: method, config, class_names, state, or the fields of version 2
        (epoch, best, optimizer, callbacks, ...), which go into `state`."""
        state = {**_state_from_fields(values), **values.pop("state", {})}
        return cls(model=ModelRecord(name, num_classes, dict(kwargs or {})), model_state=model.state_dict(),
                   state=state, **values)

    def weights_only(self) -> "Checkpoint":
        """This checkpoint without what only resuming needs (optimizer, scheduler and scaler state,
        the method's extras, RNG and callback state, a mid-epoch position): about half the size
        under SGD with momentum, and still what `kdlab eval`, a teacher and a generation load."""
        train = {**self.state.get("train", {}), "partial": None}
        return replace(self, state={"train": train})

    # ------------------------------------------------------------------ reading the state
    @property
    def train(self) -> TrainState:
        """The run's position (`TrainState`) when saved."""
        state = TrainState()
        state.load_state_dict(self.state.get("train") or {})
        return state

    @property
    def epoch(self) -> int:
        return self.train.epoch

    @property
    def best(self) -> dict[str, float]:
        """Best-epoch metrics: {"top1": .., "top5": ..} (classification), {"bbox_ap": ..} (detection)."""
        return self.train.best

    @property
    def best_epoch(self) -> int:
        return self.train.best_epoch

    @property
    def history(self) -> list[dict]:
        return self.train.history

    @property
    def skipped_batches(self) -> int:
        return self.train.skipped_batches

    @property
    def partial(self) -> dict | None:
        """Mid-epoch position of a Ctrl-C save: {"batches": int, "sums": {...}}; None at epoch ends."""
        return self.train.partial

    @property
    def optimizer(self) -> dict | None:
        return self.state.get("optimizer")

    @property
    def scheduler(self) -> dict | None:
        return self.state.get("scheduler")

    @property
    def scaler(self) -> dict | None:
        return self.state.get("scaler")

    @property
    def rng(self) -> dict | None:
        return self.state.get("rng")

    @property
    def extra_state(self) -> dict[str, Tensor]:
        return self.state.get("extras") or {}

    @property
    def callbacks(self) -> dict[str, dict]:
        """Per-callback state, keyed by callback name."""
        prefix = callback_component("")
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    @property
    def best_top1(self) -> float:
        """The best epoch's top-1 accuracy; NaN when not recorded (no evaluation yet, detection)."""
        return float(self.best.get("top1", math.nan))

    @property
    def best_top5(self) -> float:
        """The best epoch's top-5 accuracy; NaN when not recorded."""
        return float(self.best.get("top5", math.nan))

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write the current format atomically (a crash mid-save keeps the old file)."""
        atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Checkpoint":
        """Read a checkpoint of any readable version; every failure is one `CheckpointError`."""
        return cls.from_dict(_read(path, map_location), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout of the current version: plain containers and tensors only."""
        return {"format": FORMAT, "version": CURRENT_VERSION, "model": asdict(self.model),
                "model_state": self.model_state, "method": self.method, "config": self.config,
                "class_names": self.class_names, "state": self.state}

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "Checkpoint":
        """Validate and upgrade a loaded dict; `source` (the file) names it in errors."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source!r} is not a kdlab checkpoint (it holds a {type(d).__name__}, "
                                  f"not a dict); {NOT_A_CHECKPOINT_FIX}")
        marker = d.get("format")
        if marker is None:
            plain = bool(d) and all(isinstance(v, Tensor) for v in d.values())
            what = "a plain state dict (parameter names -> tensors)" if plain else f"no '{FORMAT}' format marker"
            raise CheckpointError(f"{source!r} is not a kdlab checkpoint ({what}); {NOT_A_CHECKPOINT_FIX}")
        version = d.get("version", 1)  # hand-built files before versions were checked
        readable = f"this kdlab reads '{FORMAT}' versions {READABLE_VERSIONS[0]}-{READABLE_VERSIONS[-1]}"
        if marker != FORMAT:
            raise CheckpointError(
                f"{source!r} has format {marker!r}, which this kdlab does not know ({readable}); if a newer "
                "kdlab wrote it, upgrade kdlab; otherwise " + NOT_A_CHECKPOINT_FIX)
        is_int = isinstance(version, int) and not isinstance(version, bool)
        if is_int and version > CURRENT_VERSION:
            raise CheckpointError(f"checkpoint {source!r} was written by a newer kdlab (format version {version}); "
                                  f"{readable}: upgrade kdlab")
        if not is_int or version not in READABLE_VERSIONS:
            raise CheckpointError(f"checkpoint {source!r} has an unknown format version {version!r}; {readable}")
        body = {k: v for k, v in d.items() if k not in ("format", "version")}
        if version == 1:
            old_best = {new: body.pop(old, None) for old, new in cls._V1_BEST.items()}
            # best_epoch 0: no epoch evaluated yet (a Ctrl-C in epoch 1), best_top1 was a -1 sentinel.
            evaluated = (body.get("best_epoch") or 0) > 0
            body["best"] = {k: float(v) for k, v in old_best.items() if v is not None and evaluated}
        known = set(_V3_KEYS) if version == 3 else \
            {"model", "model_state", "method", "config", "class_names", "callbacks", *_TRAIN_FIELDS, *_COMPONENT_FIELDS}
        unknown = sorted(set(body) - known)
        if unknown:
            raise CheckpointError(
                f"checkpoint {source!r} (format version {version}) has fields this kdlab does not know: "
                f"{', '.join(unknown)}; it was written by another kdlab: use the kdlab that wrote it")
        for key in ("model", "model_state"):
            if not isinstance(body.get(key), dict):
                raise CheckpointError(f"checkpoint {source!r} has no {key!r} record; it is damaged or was "
                                      "not written by 'kdlab train': use another checkpoint or retrain")
        record = body["model"]
        if not isinstance(record.get("name"), str) or not isinstance(record.get("num_classes"), int):
            raise CheckpointError(f"checkpoint {source!r} has a model record without a name and class count "
                                  f"({record}); use a checkpoint written by 'kdlab train'")
        body["model"] = ModelRecord(record["name"], record["num_classes"], dict(record.get("kwargs") or {}))
        # Hand-built version-1 files may hold None where the type now has empty containers.
        body = {k: v for k, v in body.items() if v is not None}
        if version < 3:
            body["state"] = _state_from_fields(body)
        if not isinstance(body.get("state", {}), dict):
            raise CheckpointError(f"checkpoint {source!r} has a 'state' that is not a dict; it is damaged: "
                                  "use another checkpoint or retrain")
        return cls(**body, version=version)


def _read(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """What a checkpoint file holds (`from_dict` checks it is a kdlab checkpoint), read without
    executing code; a missing or unreadable file is a `CheckpointError`."""
    path = Path(path)
    try:
        exists = path.is_file()
    except OSError as exc:  # a folder on the way that may not be entered
        raise CheckpointError(f"checkpoint {str(path)!r} {access_problem(path, exc)}") from None
    if not exists:
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"checkpoint {str(path)!r} {what}; train one with 'kdlab train CONFIG' "
            "(it writes <output_dir>/<name>/best.pt and last.pt) and point to it"
        )
    try:
        return read_torch_file(path, map_location)
    except UnreadableTorchFile as exc:
        if exc.denied:
            raise CheckpointError(f"checkpoint {str(path)!r} {exc.problem}") from None
        if exc.foreign:
            raise CheckpointError(f"{str(path)!r} is not a kdlab checkpoint: it {exc.problem}. "
                                  + NOT_A_CHECKPOINT_FIX) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} {exc.problem}; use another checkpoint (best.pt, last.pt or an "
            "epoch_N.pt beside it) or retrain") from None


# ----------------------------------------------------------------------------- models


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str, expected: str) -> None:
    """Strictly load `state` into `model`, or explain which keys do not match."""
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit model {expected!r}: {problem}. "
            "Check that the config names the architecture and class count the checkpoint was trained with"
        )
    model.load_state_dict(state)


def build_model_from_checkpoint(
    path: str | Path,
    expected_name: str | None = None,
    num_classes: int | None = None,
    kwargs: dict | None = None,
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model saved in a kdlab checkpoint and load its weights.

    `expected_name` / `num_classes` come from the config that asks for this model; a
    checkpoint of another architecture or class count is refused with both named. `kwargs`
    (the config's `model.kwargs`) replace the recorded ones when given.
    """
    ckpt = Checkpoint.load(path)
    return rebuild_model(ckpt, str(path), expected_name, num_classes, kwargs), ckpt


def rebuild_model(ckpt: Checkpoint, source: str, expected_name: str | None = None, num_classes: int | None = None,
                  kwargs: dict | None = None) -> nn.Module:
    """The model of an already loaded checkpoint, built by name and loaded strictly: the one way
    every task turns a checkpoint back into a network (see `build_model_from_checkpoint`)."""
    record = ckpt.model
    if expected_name is not None and record.name != expected_name:
        raise CheckpointError(
            f"checkpoint {source!r} holds a {record.name!r} model but the config asks for "
            f"{expected_name!r}; set the model name to {record.name!r} or use a {expected_name!r} checkpoint"
        )
    if num_classes is not None and record.num_classes != num_classes:
        raise CheckpointError(
            f"checkpoint {source!r} was trained for {record.num_classes} classes but the dataset has "
            f"{num_classes}; use a checkpoint trained on this dataset"
        )
    model = create_model(record.name, num_classes=record.num_classes,
                         **(kwargs if kwargs is not None else record.kwargs))
    load_model_state(model, ckpt.model_state, source, record.name)
    return model


__all__ = [
    "CURRENT_VERSION",
    "Checkpoint",
    "FORMAT",
    "ModelRecord",
    "READABLE_VERSIONS",
    "atomic_save",
    "build_model_from_checkpoint",
    "load_model_state",
    "rebuild_model",
]
