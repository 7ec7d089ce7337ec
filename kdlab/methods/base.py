"""The distiller interface every method implements.

A `Distiller` is a small `nn.Module` holding the student, the frozen teacher and the
method's own trainable extras (for example ReviewKD's fusion modules). The teacher is
frozen three ways: no gradients, excluded from `trainable_parameters()`, and kept in eval
mode by `train()`, so its batch-norm statistics never change. Checkpoints store only the
student and the extras (`extra_state_dict()`), never the teacher's weights.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from kdlab.config.schema import MethodConfig


class StepOutput(NamedTuple):
    """What a training step returns.

    logits: the student's logits (used for training accuracy).
    losses: named, already-weighted loss terms; the optimised loss is their sum.
    stats: detached diagnostics logged per epoch but not optimised (e.g. teacher confidence).
    """

    logits: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """Linear warm-up of a loss term: min(epoch / warmup_epochs, 1), epochs counted from 1.

    Matches the DKD and ReviewKD reference code, where the factor is 1/20 in the first
    epoch and reaches 1 at epoch 20.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(float(epoch) / float(warmup_epochs), 1.0)


class Distiller(nn.Module):
    """Base class of all methods. Subclasses set `Config` and implement `forward_train`."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Whether a teacher must be given.
    requires_teacher: ClassVar[bool] = True
    #: True when the method only needs the teacher's logits (not its features); such
    #: methods can train from a precomputed teacher-output cache.
    logits_only: ClassVar[bool] = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        cfg: MethodConfig,
        *,
        input_size: tuple[int, int, int] = (3, 32, 32),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise ValueError(f"method {cfg.name!r} needs a teacher")
        self.cfg = cfg
        self.student = student
        self.input_size = tuple(input_size)
        self.num_classes = num_classes
        # Stored outside the module tree would hide it from .to(); keep it as a submodule
        # but frozen and excluded from trainable_parameters() and checkpoints.
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    # -- training-mode handling -------------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen batch-norm statistics, always
        return self

    # -- parameters and state ----------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student parameters plus the method's extras; never the teacher's."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def extra_state_dict(self) -> dict[str, Tensor]:
        """State of method-owned modules (not student, not teacher)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not (k.startswith("student.") or k.startswith("teacher."))
        }

    def load_extra_state_dict(self, state: dict[str, Tensor]) -> None:
        own = self.extra_state_dict()
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise KeyError(f"extra state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.load_state_dict({**self.state_dict(), **state})

    # -- forward -----------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        targets: Tensor | None = None,
        *,
        epoch: int = 1,
        teacher_logits: Tensor | None = None,
    ) -> Tensor | StepOutput:
        """Inference (`targets` None): the student alone, extras are training-only.
        Training (`targets` given): `forward_train`. Routing the training step through
        `forward` lets DistributedDataParallel wrap the whole distiller."""
        if targets is None:
            return self.student(images)
        return self.forward_train(images, targets, epoch=epoch, teacher_logits=teacher_logits)

    @torch.no_grad()
    def teacher_forward(self, images: Tensor, features: bool = False) -> Any:
        """The teacher's logits (or logits and features) without building a graph."""
        assert self.teacher is not None
        return self.teacher(images, features=True) if features else self.teacher(images)

    def teacher_logits(self, images: Tensor, cached: Tensor | None = None) -> Tensor:
        """Cached teacher logits when given (teacher-output cache), else a teacher forward."""
        if cached is not None:
            return cached
        return self.teacher_forward(images)

    def forward_train(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        epoch: int,
        teacher_logits: Tensor | None = None,
    ) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError
