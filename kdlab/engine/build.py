"""Build networks, distillers and data loaders from a config: the one place that wires
the registries together (so the trainer, `kdlab eval` and the analysis tools agree)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdlab.schema.experiment import DataConfig, ExperimentConfig, ModelConfig
from kdlab.engine.checkpoint import build_model_from_checkpoint
from kdlab.data.loading import loader_options
from kdlab.data.sampling import EpochSampler, SeededDataset
from kdlab.errors import ConfigError
from kdlab.methods import Distiller, method_class
from kdlab.models import create_model
from kdlab.registry import UnknownNameError


def build_network(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    """A model from its config: from a kdlab checkpoint when one is named, else fresh."""
    if mcfg.checkpoint:
        model, _ = build_model_from_checkpoint(mcfg.checkpoint, mcfg.name, num_classes, mcfg.kwargs)
        return model
    try:
        kwargs = dict(mcfg.kwargs)
        if mcfg.weights:
            kwargs["weights"] = mcfg.weights
        return create_model(mcfg.name, num_classes=num_classes, **kwargs)
    except UnknownNameError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def build_teacher(cfg: ExperimentConfig, num_classes: int) -> nn.Module | None:
    if cfg.teacher is None:
        return None
    return build_network(cfg.teacher, num_classes)


def make_distiller(cfg: ExperimentConfig, student: nn.Module, teacher: nn.Module | None, *,
                   input_size: tuple[int, int, int], num_classes: int, task: str = "classification") -> Distiller:
    """The config's method around built networks; a method that does not support `task` is
    refused (its `tasks` capability)."""
    cls = method_class(cfg.method.name)
    if task not in cls.tasks:
        raise ConfigError(f"method {cfg.method.name!r} supports {sorted(cls.tasks)}, not task {task!r}; "
                          "pick a method for this task (docs/methods.md lists them)")
    return cls(student, teacher if cls.requires_teacher else None, cfg.method,
               input_size=input_size, num_classes=num_classes)


def build_distiller(cfg: ExperimentConfig, num_classes: int, input_size: tuple[int, int, int]) -> Distiller:
    """A classification distiller with freshly built (or checkpoint-loaded) networks."""
    return make_distiller(cfg, build_network(cfg.model, num_classes), build_teacher(cfg, num_classes),
                          input_size=input_size, num_classes=num_classes)


def train_loader(dataset, cfg: DataConfig, seed: int, device_type: str, num_replicas: int = 1,
                 rank: int = 0) -> DataLoader:
    """Shuffled loader yielding (images, targets, indices) with per-sample seeded augmentation."""
    seeded = SeededDataset(dataset, seed)
    sampler = EpochSampler(seeded, seed=seed, shuffle=True, num_replicas=num_replicas, rank=rank)
    return DataLoader(
        seeded,
        batch_size=cfg.batch_size,
        sampler=sampler,
        **loader_options(cfg, device_type),
        drop_last=False,
        # The loader's own generator: starting an epoch's iterator must not draw from the global
        # RNG, or a run resumed mid-epoch (global RNG restored) would see a shifted stream.
        generator=torch.Generator(),
    )


def eval_loader(dataset, cfg: DataConfig, device_type: str, sampler=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size or max(cfg.batch_size, 128),
        shuffle=False,
        sampler=sampler,
        **loader_options(cfg, device_type),
        generator=torch.Generator(),  # as above: evaluation leaves the global RNG alone
    )
