"""Checkpoints: atomic writes, safe loads, and teacher loading with clear errors.

A checkpoint is a dict saved with `torch.save` and loaded with `weights_only=True`, so
loading never executes code. It holds the trained model (never a frozen teacher), the
method's extras, optimizer/scheduler/scaler state, the epoch, the best accuracy, RNG
states and the resolved config. Writes go to a temporary file in the same folder followed
by `os.replace`, so a crash during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.errors import CheckpointError

FORMAT = "kdlab-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` via a temporary file + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a kdlab checkpoint, turning every failure into one `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; train one with 'kdlab train CONFIG' "
            "(it writes <output_dir>/<name>/best.pt and last.pt) and point to it"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, wrong file type
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use another checkpoint "
            "(e.g. best.pt or an epoch_N.pt beside it) or retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a kdlab checkpoint (no '{FORMAT}' marker); teachers must be "
            "checkpoints written by 'kdlab train'"
        )
    return ckpt


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 6) -> str:
    """'' when `state` fits `model` exactly, else the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return format_key_problems(missing, unexpected, shapes, limit)


def format_key_problems(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 6) -> str:
    """One line naming the first `limit` keys of each kind of state-dict mismatch."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, expected: str) -> None:
    """Strictly load `state` into `model`, or explain which keys do not match."""
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit model {expected!r}: {problem}. "
            "Check that the config names the architecture and class count the checkpoint was trained with"
        )
    model.load_state_dict(state)


def checkpoint_model_spec(ckpt: dict) -> dict:
    return ckpt.get("model", {})


def build_model_from_checkpoint(
    path: str | Path,
    expected_name: str | None = None,
    num_classes: int | None = None,
    kwargs: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the model saved in a kdlab checkpoint and load its weights.

    `expected_name` / `num_classes` come from the config that asks for this model; a
    checkpoint of another architecture or class count is refused with both named.
    """
    from kdlab.models import create_model

    ckpt = load_checkpoint(path)
    spec = checkpoint_model_spec(ckpt)
    name = spec.get("name")
    saved_classes = spec.get("num_classes")
    if expected_name is not None and name is not None and name != expected_name:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {name!r} model but the config asks for "
            f"{expected_name!r}; set the model name to {name!r} or use a {expected_name!r} checkpoint"
        )
    if num_classes is not None and saved_classes is not None and saved_classes != num_classes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained for {saved_classes} classes but the dataset has "
            f"{num_classes}; use a checkpoint trained on this dataset"
        )
    model = create_model(name or expected_name, num_classes=saved_classes or num_classes, **(kwargs if kwargs is not None else spec.get("kwargs", {})))
    load_model_state(model, ckpt["model_state"], str(path), name or str(expected_name))
    return model, ckpt
