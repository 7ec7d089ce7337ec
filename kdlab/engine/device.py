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


#: Set by the user (or by the plan executor for its workers): the thread count is then kept as given.
THREAD_ENV = ("KDLAB_THREADS", "OMP_NUM_THREADS")


def runnable_elsewhere(samples: int = 5, interval: float = 0.02) -> int | None:
    """Threads of other processes ready to run on this machine now (the median of a few
    readings of /proc/loadavg's running count, less this process's own running threads);
    None where the kernel does not say (not Linux)."""
    import statistics  # lazy: only a CPU run start needs them
    import time  # lazy: as above

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            counts.append(running - _own_running_threads())
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)))


def _own_running_threads() -> int:
    """This process's threads in state R (at least the one reading)."""
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(1, n)


def share_busy_cores(logger) -> int:
    """Fewer intra-op threads when other processes keep some of the cores busy; returns the
    thread count in effect.

    Why: OpenMP threads that share cores with other busy processes do not merely get their
    share of the time; each parallel region waits for its slowest thread, which the scheduler
    has parked behind the other process. Measured (docs/speed.md, "A busy machine"): a 2-thread
    KD step took 0.80 s alone and 3.16 s beside one single-thread busy process, while one thread
    beside it took 1.57 s. So the run drops to the cores the others leave free (at least one),
    once, at its start. Only ever fewer threads than torch would use; a thread count set in
    KDLAB_THREADS or OMP_NUM_THREADS is kept (and only warned about)."""
    threads = torch.get_num_threads()
    if threads == 1:  # nothing to give up; spare the start the readings
        return threads
    others = runnable_elsewhere()
    cores = os.cpu_count() or threads
    if not others or threads + others <= cores:
        return threads
    free = max(1, cores - others)
    if any(os.environ.get(v) for v in THREAD_ENV):
        logger.warning("%d thread(s) of other processes are running on this machine's %d cores and this run was "
                       "told to use %d threads: OpenMP threads sharing busy cores run several times slower than "
                       "their share (docs/speed.md, 'A busy machine'); consider OMP_NUM_THREADS=%d",
                       others, cores, threads, free)
        return threads
    torch.set_num_threads(free)
    logger.warning("%d thread(s) of other processes are running on this machine's %d cores: this run uses %d "
                   "thread(s) instead of %d (OpenMP threads sharing busy cores run several times slower than their "
                   "share; docs/speed.md, 'A busy machine'). Results depend on the thread count; set "
                   "OMP_NUM_THREADS to fix it.", others, cores, free, threads)
    return free
