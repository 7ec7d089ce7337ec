"""A run's state, declared: what training has reached (`TrainState`), the pieces that save and
load themselves (`Stateful`), and what callbacks are given (`RunContext`).

The trainer holds a dict of components (`TrainState`, the method's extras, optimizer,
scheduler, scaler, RNG, every callback with a `key`); a checkpoint stores
`{name: component.state_dict()}` and a resume hands each entry back to the component of that
name (torchtitan's `Stateful` idea): the checkpoint knows no field of any component, and a
component added later needs no change to it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch

from kdlab.engine.seed import rng_state, set_rng_state

if TYPE_CHECKING:  # type hints only
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.distributed import DistInfo
    from kdlab.engine.run_folder import RunFolder
    from kdlab.engine.tasks import Task
    from kdlab.methods import Distiller
    from kdlab.schema.experiment import ExperimentConfig

log = logging.getLogger("kdlab")


@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint saves and a resume restores (torch modules, optimizers and schedulers
    are Stateful as they are)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where training stands: after `epoch` (0: none finished), `step` optimizer steps, the best
    epoch's reported metrics, one history row per epoch, the skipped (non-finite) batches, and
    `partial`, the position inside the next epoch of a Ctrl-C save ({"batches", "sums"[,
    "evaluating"]}; None at an epoch's end)."""

    epoch: int = 0
    step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_batches: int = 0
    partial: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best": dict(self.best), "best_epoch": self.best_epoch,
                "history": list(self.history), "skipped_batches": self.skipped_batches, "partial": self.partial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.best = dict(state.get("best") or {})
        self.best_epoch = int(state.get("best_epoch", 0))
        self.history = list(state.get("history") or [])
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.partial = state.get("partial")


class RNGState:
    """The global RNGs (Python, NumPy, torch, CUDA) as one component."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class MethodExtras:
    """A method's state outside the student (memory banks, connectors, ...): the distiller's
    `extra_state_dict`, as a component."""

    def __init__(self, distiller: "Distiller") -> None:
        self.distiller = distiller

    def state_dict(self) -> dict[str, Any]:
        return self.distiller.extra_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.distiller.load_extra_state_dict(state)


def callback_component(key: str) -> str:
    """A callback's name in the components (and a checkpoint's `state`)."""
    return f"callback/{key}"


def save_components(components: dict[str, Stateful]) -> dict[str, Any]:
    """Every component's state, by name."""
    return {name: component.state_dict() for name, component in components.items()}


def load_components(components: dict[str, Stateful], saved: dict[str, Any], source: str) -> None:
    """Hand each saved entry back to the component of its name. A component the file lacks keeps
    its fresh state (a callback added since); an entry no component takes is named in the log."""
    for name, component in components.items():
        if name in saved and saved[name] is not None:
            component.load_state_dict(saved[name])
    ignored = sorted(set(saved) - set(components))
    if ignored:
        log.info("%s holds state this run has no use for (ignored): %s", source, ", ".join(ignored))


@dataclass
class RunContext:
    """What every callback hook receives: the run's declared state, not the trainer.

    `state` changes as training goes; `snapshot(epoch, partial)` is the run's `Checkpoint` after
    `epoch` (with `partial`, the position inside the next one)."""

    cfg: "ExperimentConfig"
    folder: "RunFolder"
    state: TrainState
    task: "Task"
    data: Any
    is_main: bool
    device: torch.device
    dist: "DistInfo"
    epochs: int
    steps_per_epoch: int
    start_epoch: int
    snapshot: Callable[[int, dict[str, Any] | None], "Checkpoint"]


__all__ = ["MethodExtras", "RNGState", "RunContext", "Stateful", "TrainState", "callback_component",
           "load_components", "save_components"]
