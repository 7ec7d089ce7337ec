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

Two settings users of other trainers expect, both without host synchronisation:

- `train.grad_clip`: the gradients' global L2 norm is clipped to this value before the update
  (`torch.nn.utils.clip_grad_norm_`, computed on the device; under fp16 after unscaling);
- `train.accumulate`: the batch is split into this many micro-batches, each forwarded and
  backpropagated in turn with its loss weighted by its share of the batch, then one optimizer
  step. Without batch norm this gives the full batch's gradient (tested) with a fraction of the
  activation memory; with batch norm each micro-batch is normalised by its own statistics, as in
  every accumulating trainer. Under DDP the gradient all-reduce runs once, on the last
  micro-batch (`no_sync`). `data.batch_size` stays the batch of one optimizer step.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdlab.schema.experiment import OptimConfig
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


def _split(value: Any, bounds: list[tuple[int, int]], size: int) -> list[Any]:
    """`value` cut along its first dimension at `bounds` when it is per-sample (a tensor or
    list of length `size`), else the same value for every part."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return [value[a:b] for a, b in bounds]
    if isinstance(value, (list, tuple)) and len(value) == size:
        return [value[a:b] for a, b in bounds]
    return [value] * len(bounds)


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """`batch` split into at most `parts` micro-batches of sizes that differ by at most one
    (fewer when the batch has fewer samples), every per-sample field cut the same way."""
    size = batch.size
    parts = max(1, min(parts, size))
    edges = [round(i * size / parts) for i in range(parts + 1)]
    bounds = [(a, b) for a, b in zip(edges, edges[1:])]
    fields = {
        "images": _split(batch.images, bounds, size),
        "targets": _split(batch.targets, bounds, size),
        "indices": _split(batch.indices, bounds, size),
        "teacher_logits": _split(batch.teacher_logits, bounds, size),
    }
    extras = {k: _split(v, bounds, size) for k, v in batch.extras.items()}
    return [
        replace(batch, **{k: v[i] for k, v in fields.items()}, extras={k: v[i] for k, v in extras.items()})
        for i in range(len(bounds))
    ]


def _weighted_sum(outs: list[StepOutput], weights: list[float]) -> StepOutput:
    """One `StepOutput` for the whole batch from its micro-batches': loss terms and stats
    weighted by each micro-batch's share, logits concatenated."""
    def combine(key: str) -> dict[str, Tensor]:
        names = getattr(outs[0], key)
        return {n: sum(w * getattr(o, key)[n] for o, w in zip(outs, weights)) for n in names}

    logits = None if outs[0].logits is None else torch.cat([o.logits for o in outs])
    return StepOutput(logits, combine("losses"), combine("stats"))


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
        grad_clip: float | None = None,
        accumulate: int = 1,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.module, self.optimizer, self.scaler = module, optimizer, scaler
        self.grad_clip, self.accumulate = grad_clip, accumulate
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
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
                      *, compile: bool = False, grad_clip: float | None = None,
                      accumulate: int = 1) -> "TrainStep":
        """The step `kdlab train` builds for `distiller` (without DDP): the config's optimizer
        over its trainable parameters, the fp16 gradient scaler when `amp` is fp16, and
        `torch.compile` when asked. Benchmarks time exactly this."""
        optimizer = build_optimizer(distiller.trainable_parameters(), optim, distiller)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        module = torch.compile(distiller) if compile else distiller
        return cls(module, optimizer, scaler, device, amp, grad_clip=grad_clip, accumulate=accumulate)

    def _backward(self, loss: Tensor) -> None:
        if self.scaler.is_enabled():
            # NaN gradients make the scaler's own device-side check skip this step.
            poisoned = loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))
            self.scaler.scale(poisoned).backward()
        else:
            loss.backward()

    def _forward_backward(self, batch: Batch, epoch: int) -> StepOutput:
        """Forward and backward of the whole batch, or of its micro-batches in turn."""
        if self.accumulate == 1:
            with autocast_context(self.device, self.amp):
                out: StepOutput = self.module(batch, epoch)
            self._backward(sum(out.losses.values()))
            return out
        parts = micro_batches(batch, self.accumulate)
        weights = [part.size / batch.size for part in parts]
        outs = []
        for i, (part, weight) in enumerate(zip(parts, weights)):
            # DDP all-reduces the gradients once, after the last micro-batch's backward.
            last = i == len(parts) - 1
            no_sync = getattr(self.module, "no_sync", None)
            with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
                with autocast_context(self.device, self.amp):
                    out = self.module(part, epoch)
                self._backward(weight * sum(out.losses.values()))
            outs.append(out)
        return _weighted_sum(outs, weights)

    def _clip(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)

    def __call__(self, batch: Batch, epoch: int) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward_backward(batch, epoch)
        loss = sum(out.losses.values())
        finite = torch.isfinite(loss)
        if self.scaler.is_enabled():
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.on_device:
            self._clip()
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
            self._clip()
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
