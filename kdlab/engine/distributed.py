"""Process-group facts for single-process and torchrun (DDP) runs.

`kdlab train` started by `torchrun` sees WORLD_SIZE/RANK/LOCAL_RANK in its environment;
`init_distributed()` then joins the process group (NCCL on CUDA, gloo on CPU). Only rank 0
writes logs and checkpoints (`DistInfo.is_main`).

The DDP policy (docs/multi-gpu.md): `data.batch_size` is the global batch, split evenly over
the processes (`per_rank_batch`); training data is sharded by `EpochSampler` (a
DistributedSampler); evaluation is sharded without padding (`ShardSampler`) and its sums are
all-reduced; batch norm is per process unless `train.sync_bn` (`convert_sync_bn`), and rank
0's running statistics are broadcast before each evaluation (`broadcast_buffers`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from kdlab.errors import ConfigError
from kdlab.methods.base import Distiller


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    if rank != 0:  # one voice: the other ranks report only warnings and errors
        logging.getLogger("kdlab").setLevel(logging.WARNING)
    return DistInfo(world, rank, local_rank)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------- DDP policy (docs/multi-gpu.md)
def per_rank_batch(global_batch: int, info: DistInfo, key: str = "data.batch_size") -> int:
    """`data.batch_size` is the GLOBAL batch (the recipe's number, whatever the GPU count):
    each of the world_size processes loads global / world_size samples per step."""
    if global_batch % info.world_size:
        raise ConfigError(
            f"{key}={global_batch} is the global batch and must be divisible by the number of "
            f"processes ({info.world_size}); set {key} to a multiple of {info.world_size} "
            f"(e.g. {global_batch - global_batch % info.world_size or info.world_size})"
        )
    return global_batch // info.world_size


class ShardSampler(Sampler):
    """Evaluation shard of one rank: indices rank, rank + world, ... . Unlike
    DistributedSampler it never pads with repeated samples, so metrics summed over the
    ranks count every validation image exactly once."""

    def __init__(self, length: int, info: DistInfo) -> None:
        self.indices = range(info.rank, length, info.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def convert_sync_bn(distiller: torch.nn.Module, info: DistInfo, device_type: str) -> torch.nn.Module:
    """`train.sync_bn`: batch norm of the student and the method's extras computed over the
    global batch (SyncBatchNorm). The frozen teacher is left alone (eval mode: running
    statistics, nothing to synchronise). A no-op in a single process."""
    if not info.enabled:
        return distiller
    if device_type != "cuda":
        raise ConfigError(
            "train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm does not run on CPU; set "
            "train.sync_bn=false (each process then normalises with its own batch)"
        )
    for name, child in list(distiller.named_children()):
        if name != "teacher":
            setattr(distiller, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return distiller


def wrap_ddp(distiller: Distiller, device: torch.device | None) -> torch.nn.Module:
    """`DistributedDataParallel` over the whole distiller (its `forward` routes a `Batch` to
    `forward_train`), leaving out the buffers the method keeps identical on every rank itself
    (`Distiller.ddp_local_buffers`), which DDP would otherwise broadcast every step."""
    local = list(distiller.ddp_local_buffers)
    if local:
        # PyTorch's (underscored, long-standing) way to keep module state out of DDP's sync.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, local)
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(distiller, device_ids=ids)


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank, so all ranks
    evaluate the model rank 0 checkpoints (without SyncBatchNorm each rank's statistics
    drift apart by its last local batches)."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def shutdown_distributed() -> None:
    """Leave the process group (torchrun runs), so the process exits without warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
