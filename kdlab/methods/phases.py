"""A method-owned schedule of two phases, for the methods whose reference code trains an
initialisation phase before distilling (RepDistiller's `--init_epochs 30` for AB, FT and FSP).

The engine knows nothing of phases: `forward_train(batch, epoch)` receives the epoch (counted
from 1), and a `PhasedDistiller` returns its init-phase loss terms while `epoch <= init_epochs`
and its main terms afterwards (docs/methods.md, "Methods with phases"). Three things make the
switch safe under the engine's step:

- Same names in every step: the idle phase's terms are exact zeros, because the engine's
  non-finite monitor and the per-epoch logs key on the terms of the first step.
- No gradient, no update: what a phase does not use gets no gradient, and the engine's SGD skips
  a parameter without one (no update, no weight decay, no momentum).
- Momentum buffers for all: PyTorch's fused SGD (the engine's) cannot step a parameter group in
  which some parameters have momentum buffers and others, getting their first gradient, have
  none. So in the init phase, the run's first step also reaches every trainable
  parameter with a zero-weighted term: every parameter gets its buffer at once. The cost is one
  weight-decay step, a factor (1 - lr * weight_decay), on the parameters the init phase
  leaves idle, whose momentum buffers then start from weight_decay * p instead of nothing. The
  checkpoint records that this happened (buffer `momentum_primed`), so a resumed run, whose
  optimizer state holds every buffer, does not repeat it and resumes exactly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import NonNegativeInt
from torch import Tensor

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError
from kdlab.methods.base import Distiller, SetupContext, StepOutput


class InitPhaseConfig(MethodConfig):
    """Base of the phased methods' configs."""

    # RepDistiller's `--init_epochs 30`; 0 skips the init phase.
    init_epochs: NonNegativeInt = 30


def phase_losses(active: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    """Every one of the method's loss `names`, in that order: the active phase's terms, and
    zeros for the idle phase's, so that every step of the run returns the same terms."""
    unknown = set(active) - set(names)
    if unknown:
        raise ValueError(f"loss terms {sorted(unknown)} are not among the method's terms {names}")
    like = next(iter(active.values()))
    zero = like.new_zeros(())
    return {name: active.get(name, zero) for name in names}


class PhasedDistiller(Distiller):
    """A distiller with an init phase (epochs 1..cfg.init_epochs) and a main phase.

    Subclasses set `loss_names` (every term either phase returns), test `self.in_init_phase(epoch)`
    in `forward_train` and return `self.output(logits, active_terms, epoch)`.
    """

    loss_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Whether the first step touched every parameter. Checkpointed, so a resumed run (whose
        # optimizer state already holds every buffer) does not touch them again and resumes
        # exactly; mirrored in a Python flag so that no step reads the device.
        self.register_buffer("momentum_primed", torch.zeros((), dtype=torch.bool))
        self._momentum_primed = False

    def load_extra_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_extra_state_dict(state)
        self._momentum_primed = bool(self.momentum_primed)

    def in_init_phase(self, epoch: int) -> bool:
        return epoch <= self.cfg.init_epochs  # type: ignore[attr-defined]

    def setup(self, context: SetupContext) -> None:
        # A phase leaves some parameters without a gradient, which DistributedDataParallel
        # (built without find_unused_parameters) reports as an error on the next step.
        if context.world_size > 1:
            raise ConfigError(
                f"method {self.cfg.name!r} trains in phases (method.init_epochs) that leave some of its "
                "parameters without gradients, which DistributedDataParallel cannot run; train it on one "
                f"process (the reference runs on one GPU), not with torchrun over {context.world_size} processes"
            )

    def output(self, logits: Tensor | None, active: dict[str, Tensor], epoch: int,
               stats: dict[str, Tensor] | None = None) -> StepOutput:
        """The step's output: `active` completed with the idle phase's zeros, and on the first
        init-phase step a zero-weighted touch of every trainable parameter (momentum buffers)."""
        if self.in_init_phase(epoch) and not self._momentum_primed:
            self._momentum_primed = True
            self.momentum_primed.fill_(True)
            first = next(iter(active))
            touch = sum(p.sum() for p in self.trainable_parameters())
            active = {**active, first: active[first] + 0.0 * touch}
        return StepOutput(logits, phase_losses(active, self.loss_names), stats or {})


__all__ = ["InitPhaseConfig", "PhasedDistiller", "phase_losses"]
