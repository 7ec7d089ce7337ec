"""Which torch device a run uses: the one home of `resolve_device`.

Kept apart from the trainer so that evaluation, analysis and the teacher cache can pick a
device without importing the training loop.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

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


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: `KDLAB_HOST_MALLOC=system` leaves the C allocator as it was.
HOST_MALLOC_ENV = "KDLAB_HOST_MALLOC"
_host_memory_kept: bool | None = None


def keep_freed_host_memory() -> bool:
    """Make the C allocator reuse freed memory for large CPU tensors instead of returning it to
    the system and asking again; True when that is in effect (glibc), False where it does not
    apply (another C library) or `KDLAB_HOST_MALLOC=system` is set. Once per process.

    Why: glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it when freed,
    so each such tensor (ReviewKD's 256-channel fusion maps at 32x32, batch 64: 64 MiB each)
    pays the kernel's page faults and zeroing again on every step. Turning mmap off (the heap
    is then reused) and keeping up to 2 GiB of freed heap made the CPU ReviewKD step about 12%
    faster (benchmarks/reviewkd_step.py, docs/speed.md); the price is that the process keeps
    its peak memory instead of returning it between steps.
    """
    global _host_memory_kept
    if _host_memory_kept is None:
        _host_memory_kept = False
        if os.environ.get(HOST_MALLOC_ENV, "").lower() != "system":
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc: nothing to tune
                mallopt = None
            if mallopt is not None:
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _host_memory_kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _host_memory_kept
