"""One training step, shared by the trainer and every benchmark.

`TrainStep(batch, epoch)` runs the whole update that `kdlab train` runs: the method's forward
under autocast, the sum of its loss terms, the non-finite guard, backward through the gradient
scaler, and the optimizer step. Benchmarks time this object, so what they measure is exactly
what users train with.

The non-finite guard needs no host synchronisation. Reading `torch.isfinite(loss)` on the host
every step would stall a GPU once per step, so the flag stays on the device:

- the optimizer is fused (SGD and AdamW on CPU and CUDA), and a fused step takes a `found_inf`
  tensor and skips the update on the device when it is set, the mechanism the fp16 gradient
  scaler uses; a non-finite loss therefore never touches the weights or the momentum;
- with the fp16 scaler the loss is multiplied by NaN when it is not finite, so that the scaler's
  own gradient check (which already runs on the device) sees it and skips the step;
- `NonFiniteMonitor` accumulates, on the device, how many steps were skipped and the loss terms
  of the first one; the trainer reads it every `train.check_every` steps and at the end of each
  epoch, and only then applies `train.nonfinite` (stop naming the batch and the last good
  checkpoint, or count the skip against `train.max_skipped`).

An optimizer that cannot skip on the device (not fused) falls back to one host read per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdlab.config.schema import OptimConfig
from kdlab.engine.device import keep_freed_host_memory
from kdlab.engine.evaluate import autocast_context
from kdlab.engine.optim import build_optimizer
from kdlab.methods.base import Batch, StepOutput


class StepResult(NamedTuple):
    """loss: the summed loss (detached); finite: a 0-dim bool tensor on the device, False when
    the update was skipped; out: the method's `StepOutput`."""

    loss: Tensor
    finite: Tensor
    out: StepOutput


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a device-side `found_inf` (fused SGD/AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class TrainStep:
    """Forward, loss terms, AMP and gradient scaler, non-finite guard, backward, optimizer step.

    module: the distiller, or its DDP/compiled wrapper (called as `module(batch, epoch)`).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        device: torch.device,
        amp: str = "none",
        *,
        check_grads: bool = False,
    ) -> None:
        self.module, self.optimizer, self.scaler = module, optimizer, scaler
        self.device, self.amp = device, amp
        self.on_device = skips_on_device(optimizer)
        # Under DDP one rank's non-finite loss reaches every rank through the gradient
        # all-reduce, so each rank also checks the (reduced) gradients: all skip together.
        self.check_grads = check_grads
        self._unit_scale = torch.ones((), device=device)
        if device.type == "cpu":
            keep_freed_host_memory()

    @classmethod
    def for_distiller(cls, distiller: nn.Module, optim: OptimConfig, device: torch.device, amp: str = "none",
                      *, compile: bool = False) -> "TrainStep":
        """The step `kdlab train` builds for `distiller` (without DDP): the config's optimizer
        over its trainable parameters, the fp16 gradient scaler when `amp` is fp16, and
        `torch.compile` when asked. Benchmarks time exactly this."""
        optimizer = build_optimizer(distiller.trainable_parameters(), optim)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        module = torch.compile(distiller) if compile else distiller
        return cls(module, optimizer, scaler, device, amp)

    def __call__(self, batch: Batch, epoch: int) -> StepResult:
        with autocast_context(self.device, self.amp):
            out: StepOutput = self.module(batch, epoch)
        loss = sum(out.losses.values())
        finite = torch.isfinite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            # NaN gradients make the scaler's own device-side check skip this step.
            poisoned = loss * torch.where(finite, 1.0, float("nan"))
            self.scaler.scale(poisoned).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.on_device:
            loss.backward()
            found_inf = (~finite).float()
            if self.check_grads:
                grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                         if p.grad is not None]
                # Sets found_inf to 1 where any gradient is not finite (scale 1: values unchanged).
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self._unit_scale)
                finite = found_inf == 0
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]
            self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(finite):  # fallback: one host read per step
            loss.backward()
            self.optimizer.step()
        return StepResult(loss.detach(), finite, out)


class NonFiniteMonitor:
    """Device-side record of skipped steps: their count, and the first one's batch number and
    loss terms, read on the host only when the trainer asks (`poll`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.count = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_batch = torch.full((), -1, dtype=torch.long, device=self.device)
        self.first_terms: Tensor | None = None
        self.names: list[str] = []

    def record(self, result: StepResult, batch_number: int) -> None:
        bad = ~result.finite
        terms = torch.stack([v.detach().float().reshape(()) for v in result.out.losses.values()])
        first = bad & (self.first_batch < 0)
        if self.first_terms is None:
            self.first_terms = torch.zeros_like(terms)
            self.names = list(result.out.losses)
        self.first_terms = torch.where(first, terms, self.first_terms)
        self.first_batch = torch.where(first, torch.as_tensor(batch_number, device=self.device), self.first_batch)
        self.count += bad.long()

    def poll(self) -> tuple[int, int, dict[str, float]]:
        """(steps skipped since the last reset, the first one's batch number, its loss terms):
        one host synchronisation."""
        count, first = int(self.count), int(self.first_batch)
        terms = {}
        if count and self.first_terms is not None:
            terms = dict(zip(self.names, self.first_terms.tolist()))
        return count, first, terms


__all__ = ["NonFiniteMonitor", "StepResult", "TrainStep", "skips_on_device"]
