"""What the trainer needs from a task (classification, detection): data, networks, batches,
and the evaluation metric. The training loop itself is the same for every task.

A task answers five questions for `Trainer`:

- `build_data(cfg)`: the training and validation sets (`TaskData`);
- `build_networks(cfg, data)`: the student and the frozen teacher (None without one);
- `train_loader(...)` / `eval_loader(...)`: iterables of raw batches; the training loader's
  `sampler.set_epoch(epoch, start)` fixes the epoch's order and the position to resume from,
  so that an interrupted run resumes bit-exactly;
- `to_batch(raw, device, channels_last)`: a raw batch as the `Batch` methods receive;
- `evaluate(model, loader, ...)`: the validation metrics; `primary_metric` (higher is better)
  picks `best.pt`, `reported_metrics` go to `result.json` as last and best values
  (`kdlab.engine.result.RunResult`), and `headline_metrics` are the ones tables of runs show;
- `check_data(cfg)`: whether the data can be built, asked before any training (`kdlab reproduce`).

A task is found by its `task:` name (`kdlab.engine.tasks.register_task`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable

import torch
from pydantic import BaseModel
from torch import nn

from kdlab.schema.experiment import ExperimentConfig
from kdlab.data.datasets import DataBundle
from kdlab.engine.distributed import DistInfo
from kdlab.methods.base import Batch


# The datasets of a run and what networks and methods need to know about them: every task
# describes its data with the data layer's `DataBundle` (train, val, num_classes, class_names,
# input_size, train_targets).
TaskData = DataBundle


class Task(ABC):
    """One kind of training problem; see the module docstring."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    reported_metrics: ClassVar[tuple[str, ...]]
    #: The reported metrics a table of runs shows (`kdlab results`, the --seeds summary).
    headline_metrics: ClassVar[tuple[str, ...]]
    #: The run's settings section of this task (`kdlab.schema.tasks.TASK_SETTINGS`), set by
    #: `task_for`; None for a task without one.
    settings: BaseModel | None = None

    @abstractmethod
    def build_data(self, cfg: ExperimentConfig) -> TaskData: ...

    def check_data(self, cfg: ExperimentConfig) -> None:
        """Raise `DataError`/`ConfigError` when the data of `cfg` cannot be built (planning a
        run, e.g. `kdlab reproduce`, before any training); by default, build it."""
        self.build_data(cfg)

    @abstractmethod
    def build_networks(self, cfg: ExperimentConfig, data: TaskData) -> tuple[nn.Module, nn.Module | None]: ...

    @abstractmethod
    def train_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int, device: torch.device,
                     dist: DistInfo) -> Iterable: ...

    @abstractmethod
    def eval_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int | None,
                    device: torch.device, dist: DistInfo) -> Iterable: ...

    @abstractmethod
    def to_batch(self, raw: Any, device: torch.device, *, channels_last: bool = False) -> Batch: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Iterable, data: TaskData, cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, float]: ...


__all__ = ["Task", "TaskData"]
