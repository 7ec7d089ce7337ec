"""Optimizer and learning-rate schedule from the config.

With `schedule.unit: epoch` (default) the schedule is a per-epoch multiplier (as in the
DKD/ReviewKD reference code, which set the learning rate once per epoch): linear warm-up over
`warmup_epochs`, then multi-step decay (x gamma once epoch >= each milestone, epochs counted
from 0, i.e. the reference's `epoch > milestone` with 1-based epochs), cosine annealing to
`min_lr`, or constant. With `unit: iteration` the same shapes count optimizer steps, and the
warm-up rises linearly from `warmup_start_factor` over `warmup_iterations` steps, as
Detectron2's WarmupMultiStepLR does for the detection recipes.

The optimizer is fused where the device has fused kernels: a fused step can skip itself on
the device, which the training step's non-finite guard relies on (`kdlab.engine.step`).
With `optim.norm_weight_decay` the normalisation layers' parameters form a second parameter
group with that decay (Detectron2's WEIGHT_DECAY_NORM, torchvision's `norm_weight_decay`).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from kdlab.schema.experiment import OptimConfig, ScheduleConfig


# Device types whose fused SGD/AdamW kernels exist; a fused step can skip itself on the device
# (`found_inf`), which is what lets the training step guard against NaN without a host sync.
FUSED_DEVICES = ("cpu", "cuda")


def parameter_groups(params: list[nn.Parameter], cfg: OptimConfig, model: nn.Module | None) -> list[dict]:
    """`params` as the optimizer's groups: one, or with `cfg.norm_weight_decay` the parameters of
    `model`'s normalisation layers (torchvision's list: batch, group, layer, instance and local
    response norms) apart, with that decay. Both keep the order of `params`."""
    if cfg.norm_weight_decay is None or cfg.norm_weight_decay == cfg.weight_decay:
        return [{"params": params}]
    if model is None:
        raise ValueError("optim.norm_weight_decay needs the model, to find its normalisation layers")
    from torchvision.ops._utils import split_normalization_params  # lazy: torchvision.ops, only for this setting

    norm = {id(p) for p in split_normalization_params(model)[0]}
    groups = [{"params": [p for p in params if id(p) not in norm]},
              {"params": [p for p in params if id(p) in norm], "weight_decay": cfg.norm_weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig,
                    model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The config's optimizer over `params` (`model`: the module holding them, needed with
    `optim.norm_weight_decay`)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params) \
        and len({p.device for p in params}) == 1
    groups = parameter_groups(params, cfg, model)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay, fused=fused or None,
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(epoch: int, total_epochs: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate for 0-based `epoch` (an iteration with
    `unit: iteration`, and `total_epochs` the total iterations)."""
    if cfg.unit == "iteration":
        if cfg.warmup_iterations and epoch < cfg.warmup_iterations:
            alpha = epoch / cfg.warmup_iterations
            warm = cfg.warmup_start_factor * (1 - alpha) + alpha
        else:
            warm = 1.0
        return warm * _decay(epoch, total_epochs, cfg, base_lr, 0)
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    return _decay(epoch, total_epochs, cfg, base_lr, cfg.warmup_epochs)


def _decay(epoch: int, total_epochs: int, cfg: ScheduleConfig, base_lr: float, warmup: int) -> float:
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(total_epochs - warmup, 1)
        progress = min(max(epoch - warmup, 0) / span, 1.0)
        floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per epoch, or once per step with `unit: iteration` (then
    `total_epochs` is the total number of steps); its state_dict goes into checkpoints."""
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, total_epochs, cfg, base_lr)
    )
