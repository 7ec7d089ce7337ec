"""Optimizer and learning-rate schedule from the config.

The schedule is a per-epoch multiplier (as in the DKD/ReviewKD reference code, which set
the learning rate once per epoch): linear warm-up over `warmup_epochs`, then multi-step
decay (x gamma once epoch >= each milestone, epochs counted from 0, i.e. the reference's
`epoch > milestone` with 1-based epochs), cosine annealing to `min_lr`, or constant.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kdlab.config.schema import OptimConfig, ScheduleConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(epoch: int, total_epochs: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate for 0-based `epoch`."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(total_epochs - cfg.warmup_epochs, 1)
        progress = min(max(epoch - cfg.warmup_epochs, 0) / span, 1.0)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per epoch (its state_dict goes into checkpoints)."""
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, total_epochs, cfg, base_lr)
    )
