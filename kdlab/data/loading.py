"""How a run's DataLoaders are set up: worker processes (`data.num_workers`), pinned memory and
persistent workers, the same for every loader kdlab builds."""
from __future__ import annotations

import os
from typing import Any

from kdlab.schema.experiment import DataConfig

#: Most workers `auto` starts per training process on an accelerator.
MAX_AUTO_WORKERS = 8


def resolve_workers(num_workers: int | str, device_type: str) -> int:
    """`data.num_workers` as a number: an explicit count as given; `auto` is 0 when training on
    the CPU and otherwise one per spare core of this process's share of the machine (torchrun's
    LOCAL_WORLD_SIZE processes share it), at most 8.

    Why 0 on the CPU: the training step's OpenMP threads already use every core, so loader
    workers decoding the next batch take cores from the step, whose threads then wait at their
    barriers; decoding in the main process between steps costs less (`benchmarks/
    train_throughput.py`, docs/speed.md). On a GPU the step leaves the cores free for workers.
    """
    if num_workers != "auto":
        return int(num_workers)
    if device_type == "cpu":
        return 0
    cores = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


def loader_options(cfg: DataConfig, device_type: str) -> dict[str, Any]:
    """The DataLoader keyword arguments a data config gives on a device: the resolved worker
    count, memory pinned only for CUDA, workers kept alive between epochs only if there are any."""
    workers = resolve_workers(cfg.num_workers, device_type)
    return {"num_workers": workers, "pin_memory": cfg.pin_memory and device_type == "cuda",
            "persistent_workers": cfg.persistent_workers and workers > 0}


__all__ = ["MAX_AUTO_WORKERS", "loader_options", "resolve_workers"]
