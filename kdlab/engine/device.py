"""Which torch device a run uses: the one home of `resolve_device`.

Kept apart from the trainer so that evaluation, analysis and the teacher cache can pick a
device without importing the training loop.
"""
from __future__ import annotations

import torch

from kdlab.errors import KDLabError


def resolve_device(spec: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else as `torch.device(spec)`.

    Asking for CUDA on a machine without it is a `KDLabError` naming the fix.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDLabError(f"train.device={spec!r} but CUDA is not available here; use train.device=cpu or auto")
    return device
