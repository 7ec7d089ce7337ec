"""Load a local weight file (`model.weights`) into a torchvision, timm or custom model.

kdlab never downloads: pretrained weights come from a file the user placed on disk
(`.pth`/`.pt`/`.bin` via `torch.load(weights_only=True)`, `.safetensors` via safetensors).
The file may hold a bare state dict or one wrapped under `state_dict`/`model`/`model_state`
(common training-script layouts); a `module.` prefix left by DataParallel/DDP is removed.

Loading is strict: a missing or unexpected key, or a shape mismatch, is a `CheckpointError`
that names the keys. The one intended mismatch, a classifier head trained for another number
of classes (ImageNet weights, 10-class data), is allowed only with `reset_head=True`
(`model.kwargs: {reset_head: true}`): every other weight is loaded and the head keeps its
fresh initialisation.

This module also holds what every reader of a torch file needs, so that models/ never imports
the engine: `read_torch_file` (a `weights_only` load whose failures are explained without
PyTorch's advice to disable `weights_only`) and the state-dict key-mismatch formatting.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_ema")


class UnreadableTorchFile(Exception):
    """`read_torch_file` failed. `problem` completes "<file> ...", for example "is corrupt or
    truncated (its zip archive is incomplete)"; `foreign` is True when the file holds pickled
    Python objects other than tensors and plain containers; `denied` when the file could not be
    opened at all (permissions): then the file itself may be fine."""

    def __init__(self, problem: str, foreign: bool, denied: bool = False) -> None:
        super().__init__(problem)
        self.problem, self.foreign, self.denied = problem, foreign, denied


def access_problem(path: str | Path, exc: OSError) -> str:
    """Completes "<file> ..." for a file the operating system would not let kdlab read."""
    if isinstance(exc, PermissionError):
        try:
            st = os.stat(path)
            whose = f" (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
        except OSError:  # its folder cannot be entered either
            whose = " (on the file or its folder)"
        return (f"cannot be read: permission denied{whose.rstrip()}; the file is not damaged: ask its owner to "
                f"make it readable (chmod a+r {path}), or copy it somewhere you can read")
    return f"cannot be read ({exc.strerror or exc})"


def _pickled_globals(path: str | Path) -> list[str] | None:
    """The Python objects a well-formed pickle in `path` names (torch.save's `data.pkl` inside its
    zip archive, or a plain pickle), read opcode by opcode without running anything; None when the
    file holds no well-formed pickle (it is damaged, or not a pickle at all)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            data = Path(path).read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
    except Exception:  # noqa: BLE001 - any parse failure means: no well-formed pickle
        return None
    return [n for n in dict.fromkeys(names) if not n.startswith("torch.") and n != "collections.OrderedDict"]


def read_torch_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: never executes code from the file.

    Raises `UnreadableTorchFile` with kdlab's own wording, telling apart a file the operating
    system will not open (`denied`), a well-formed pickle that holds other objects than tensors
    and plain containers (`foreign`: torch's weights-only unpickler refused it) and a damaged file.
    The distinction is made from the exception's type and the file itself (its pickle is parsed
    opcode by opcode), not from torch's wording, which changes between versions. PyTorch's error
    text is never passed on: it advises re-running `torch.load` with `weights_only=False`, which
    would execute arbitrary code from an untrusted file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:  # permissions, a folder, an I/O error: raised before anything is read
        raise UnreadableTorchFile(access_problem(path, exc), foreign=False, denied=True) from None
    except Exception as exc:  # truncated zip, pickled classes, not a torch file at all
        text = str(exc)
        found = _pickled_globals(path) if isinstance(exc, pickle.UnpicklingError) else None
        if found is not None:
            named = re.search(r"GLOBAL ([\w.]+)", text)
            shown = named.group(1) if named else ", ".join(found[:3]) or "objects of other types"
            raise UnreadableTorchFile(
                f"holds pickled Python objects ({shown}), not only tensors and plain "
                "containers; kdlab never unpickles such objects, because unpickling runs code from the file",
                foreign=True) from None
        if isinstance(exc, EOFError) or "zip archive" in text or "PytorchStreamReader" in text:
            raise UnreadableTorchFile("is corrupt or truncated (its data ends early or its zip archive "
                                      "is incomplete)", foreign=False) from None
        raise UnreadableTorchFile("is corrupt or truncated, or is not a file written by torch.save",
                                  foreign=False) from None


def format_key_problems(missing: list[str], unexpected: list[str], shapes: list[str], limit: int = 6) -> str:
    """One line naming the first `limit` keys of each kind of state-dict mismatch."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def describe_mismatch(model: nn.Module, state: dict[str, Tensor], limit: int = 6) -> str:
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


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local weight file, or a `CheckpointError` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"model.weights file {str(path)!r} does not exist; kdlab never downloads weights: "
            f"save them to that file (torch.save(model.state_dict(), {path.name!r}) on a machine with "
            "internet access, or the hub's .pth/.safetensors file; docs/own-model.md shows how) and point "
            "model.weights (or teacher.weights) at it, or remove model.weights to train from scratch"
        )
    fix = "use a .pth/.pt file written by torch.save(model.state_dict(), ...) or a .safetensors file"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: only .safetensors files need it

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # truncated or not a safetensors file
            raise CheckpointError(
                f"model.weights file {str(path)!r} cannot be read as safetensors "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); {fix}"
            ) from None
    else:
        try:
            state = read_torch_file(path)
        except UnreadableTorchFile as exc:
            raise CheckpointError(f"model.weights file {str(path)!r} {exc.problem}"
                                  + ("" if exc.denied else f"; {fix}")) from None
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                state = inner
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"model.weights file {str(path)!r} holds no state dict (a mapping of parameter names "
            "to tensors); save one with torch.save(model.state_dict(), path). A checkpoint "
            "written by 'kdlab train' goes in model.checkpoint instead"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def head_prefix(model: nn.Module, num_classes: int) -> str | None:
    """Qualified name of the classifier layer: the last Linear (or 1x1 Conv, as in
    SqueezeNet) producing `num_classes` outputs. None if there is no such layer."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            found = name
    return found


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    label: str,
    head: str | None,
    reset_head: bool = False,
) -> None:
    """Strictly load the file at `path` into `model` (see the module docstring).

    label: the model's config name, for messages. head: qualified name of the classifier
    layer whose keys `reset_head` drops (and whose mismatch gets the reset_head hint).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    is_head = (lambda k: head is not None and (k == head or k.startswith(head + ".")))
    if reset_head:
        state = {k: v for k, v in state.items() if not is_head(k)}
        own = {k: v for k, v in own.items() if not is_head(k)}
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad_shape and all(is_head(k) for k in bad_shape) and not missing and not unexpected:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape)
        raise CheckpointError(
            f"model.weights {str(path)!r} has a classifier head for another number of classes than "
            f"{label!r} here ({shapes}); to keep the pretrained backbone and train a fresh head, "
            "set model.kwargs.reset_head=true (or use weights trained on this dataset)"
        )
    if missing or unexpected or bad_shape:
        problem = format_key_problems(missing, unexpected, [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape])
        raise CheckpointError(
            f"model.weights {str(path)!r} does not fit model {label!r}: {problem}. Check that the "
            "file holds weights of exactly this architecture (same name and variant)"
        )
    model.load_state_dict(state, strict=not reset_head)

