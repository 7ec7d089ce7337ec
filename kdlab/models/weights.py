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
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kdlab.engine.checkpoint import format_key_problems
from kdlab.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_ema")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local weight file, or a `CheckpointError` saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"model.weights file {str(path)!r} does not exist; kdlab never downloads weights: "
            "save them to a local file (e.g. torch.save(model.state_dict(), 'resnet18.pth') on a "
            "machine with internet access, or the hub's .pth/.safetensors file) and point "
            "model.weights (or teacher.weights) at it"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # wrong format, truncated file, pickled code
        raise CheckpointError(
            f"model.weights file {str(path)!r} cannot be read as a state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "use a .pth/.pt file written by torch.save(model.state_dict(), ...) or a .safetensors file"
        ) from None
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

