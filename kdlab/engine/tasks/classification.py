"""Image classification: the zoo/torchvision/timm networks, the classification datasets, the
standard (DataLoader) and GPU-resident pipelines, and top-1/top-5 evaluation."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from kdlab.schema.experiment import ExperimentConfig
from kdlab.data import build_datasets
from kdlab.data.gpu_pipeline import gpu_loaders
from kdlab.engine.build import build_network, eval_loader, train_loader
from kdlab.engine.distributed import DistInfo, ShardSampler
from kdlab.engine.evaluate import evaluate
from kdlab.engine.tasks.base import Task, TaskData
from kdlab.methods.base import Batch


class ClassificationTask(Task):
    name = "classification"
    primary_metric = "top1"
    reported_metrics = ("top1", "top5")
    headline_metrics = ("top1", "top5")

    def __init__(self) -> None:
        self._gpu_key: tuple | None = None
        self._gpu: tuple[Any, Any] | None = None

    def build_data(self, cfg: ExperimentConfig) -> TaskData:
        return build_datasets(cfg.data)

    def check_data(self, cfg: ExperimentConfig) -> None:
        # The whole sets, without noise: one check serves every subset and noise rate of a dataset.
        build_datasets(cfg.data.model_copy(update={"train_subset": None, "label_noise": 0.0}), seed=cfg.train.seed)

    def build_networks(self, cfg: ExperimentConfig, data: TaskData) -> tuple[nn.Module, nn.Module | None]:
        student = build_network(cfg.model, data.num_classes)
        teacher = build_network(cfg.teacher, data.num_classes) if cfg.teacher is not None else None
        return student, teacher

    def _loaders(self, data: TaskData, cfg: ExperimentConfig, batch_size: int, eval_batch: int | None,
                 device: torch.device, dist: DistInfo) -> tuple[Any, Any]:
        # The GPU pipeline builds both loaders from one device-resident copy of the data.
        key = (id(data), batch_size, eval_batch, str(device))
        if self._gpu_key != key:
            data_cfg = cfg.data.model_copy(update={"batch_size": batch_size, "eval_batch_size": eval_batch})
            self._gpu = gpu_loaders(data, data_cfg, cfg.train.seed, device, channels_last=cfg.train.channels_last,
                                    num_replicas=dist.world_size, rank=dist.rank)
            self._gpu_key = key
        return self._gpu

    def train_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int, device: torch.device,
                     dist: DistInfo) -> Iterable:
        if cfg.data.pipeline == "gpu":  # uint8 data on the device, batch-wide crop/flip (docs/speed.md)
            eval_batch = cfg.data.eval_batch_size and max(cfg.data.eval_batch_size // dist.world_size, 1)
            return self._loaders(data, cfg, batch_size, eval_batch, device, dist)[0]
        data_cfg = cfg.data.model_copy(update={"batch_size": batch_size})
        return train_loader(data.train, data_cfg, cfg.train.seed, device.type,
                            num_replicas=dist.world_size, rank=dist.rank)

    def eval_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int | None, device: torch.device,
                    dist: DistInfo) -> Iterable:
        if cfg.data.pipeline == "gpu":
            train_batch = max(cfg.data.batch_size // dist.world_size, 1)
            return self._loaders(data, cfg, train_batch, batch_size, device, dist)[1]
        data_cfg = cfg.data.model_copy(update={"eval_batch_size": batch_size})
        # Each rank evaluates its own shard; evaluate() sums the metrics over ranks.
        shard = ShardSampler(len(data.val), dist) if dist.enabled else None
        return eval_loader(data.val, data_cfg, device.type, sampler=shard)

    def to_batch(self, raw: Any, device: torch.device, *, channels_last: bool = False) -> Batch:
        # (images, targets, indices[, views]); views come from data.pipeline=gpu.
        images = raw[0].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        extras = {"views": raw[3]} if len(raw) > 3 else {}
        return Batch(images, raw[1].to(device, non_blocking=True), raw[2].to(device, non_blocking=True),
                     extras=extras)

    def evaluate(self, model: nn.Module, loader: Iterable, data: TaskData, cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, float]:
        return evaluate(model, loader, data.num_classes, device, cfg.train.amp, cfg.train.channels_last)


__all__ = ["ClassificationTask"]
