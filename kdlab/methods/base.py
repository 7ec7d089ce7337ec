"""The method protocol: everything a distillation method may rely on, and nothing more.

A method is a `Distiller`, a small `nn.Module` holding the student, the frozen teacher and
the method's own trainable extras (ReviewKD's fusion modules, CRD's embeddings and memory
bank). The engine talks to a method only through what this module declares:

- capabilities, as class attributes the engine reads before training
  (`requires_teacher`, `needs_teacher_features`, `needs_sample_indices`, `tasks`);
- `setup(context)`, called once before training with a `SetupContext` (the training set,
  its size, the run folder, the device and the distributed world);
- `forward_train(batch, epoch)`, one training step's loss terms for a `Batch`, returned as a
  `StepOutput`;
- `trainable_parameters()` and `extra_state_dict()` / `load_extra_state_dict()`, what the
  optimizer updates and what a checkpoint stores besides the student.

The teacher is frozen three ways: no gradients, excluded from `trainable_parameters()`, and
kept in eval mode by `train()`, so its batch-norm statistics never change. Checkpoints store
only the student and the extras, never the teacher's weights. `docs/methods.md` walks
through writing a method of your own against this contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence, Sized

import torch
from torch import Tensor, nn

from kdlab.schema.experiment import DataConfig, MethodConfig


@dataclass
class Batch:
    """One training batch, as the engine hands it to `forward_train`.

    images: classification: a float tensor (N, C, H, W), already augmented and normalised,
        on the training device (channels-last when `train.channels_last`). Detection: a list
        of N (C, H, W) tensors of varying size.
    targets: classification: class indices (N,) on the device. Detection: a list of N dicts
        (`boxes` (K, 4) xyxy, `labels` (K,), `masks` (K, H, W) for instance segmentation).
    indices: each sample's index in the training set (N,), on the device: stable across
        epochs and augmentations, and what a memory bank (CRD) or a per-sample split
        (`dkd_split`) is keyed by.
    teacher_logits: the fp16-rounded teacher logits of exactly these views when a
        teacher-output cache is in use (`teacher.cache`), else None: use `Distiller.teacher_logits(batch)`, which
        falls back to a teacher forward.
    extras: task-specific fields a data pipeline adds (for example image sizes); empty for
        classification.
    """

    images: Any
    targets: Any
    indices: Tensor | None = None
    teacher_logits: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The number of samples in the batch."""
        return len(self.images) if isinstance(self.images, (list, tuple)) else int(self.images.shape[0])


@dataclass(frozen=True)
class SetupContext:
    """What `Distiller.setup` receives, once, after the distiller is built and moved to the
    device, before the optimizer, DistributedDataParallel and `torch.compile` see it (so
    parameters and buffers created here are trained, synchronised and checkpointed like any
    other), and before a checkpoint is resumed (so state set up here is then overwritten by the
    checkpoint's, as it should be).

    train_set: the training dataset exactly as the loader reads it (with augmentation; an
        item is `(image, target)`); `num_train_samples` is its length, the size of a memory
        bank indexed by `Batch.indices`.
    train_targets: every training sample's label, in `train_set` order (after label noise
        and subsetting), or None when the task has no per-sample class label.
    data_cfg: the `data` section, to build other views of the same data (for example the
        un-augmented training set) with `kdlab.data.build_datasets`.
    run_dir: the run folder on the main process, None on the others: write records there.
    world_size, rank: the distributed world (1 and 0 without torchrun). Gather across ranks
        with `torch.distributed` when `world_size > 1`.
    """

    train_set: Sized
    num_train_samples: int
    num_classes: int
    data_cfg: DataConfig
    seed: int
    device: torch.device
    run_dir: Path | None
    world_size: int = 1
    rank: int = 0
    train_targets: Sequence[int] | None = None


class StepOutput(NamedTuple):
    """What a training step returns.

    logits: the student's class logits, used for the training accuracy (None where there is
        no such thing, as for a detector).
    losses: named, already-weighted loss terms; the optimised loss is their sum, and each
        is logged as `train/<name>`.
    stats: detached diagnostics logged per epoch as `stat/<name>`, never optimised (for
        example the teacher's mean target confidence).
    """

    logits: Tensor | None
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
    """Base class of all methods. Subclasses set `Config` and implement `forward_train`.

    Capabilities (class attributes, read by the engine before training):

    requires_teacher: a `teacher` section must be given (False for `vanilla` and the
        tolerant patriarch, which train from labels).
    needs_teacher_features: the method reads the teacher's intermediate features, not only
        its logits; such a method cannot train from a teacher-output cache.
    needs_sample_indices: the method reads `Batch.indices` (memory banks, per-sample
        splits); the engine refuses a data pipeline that cannot provide them.
    tasks: the tasks the method supports (`classification`, `detection`).
    ddp_local_buffers: names of buffers (as in `state_dict()`) that every process keeps
        identical itself (for example a memory bank updated from all-gathered values), so that
        DistributedDataParallel neither broadcasts nor checks them each step.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    requires_teacher: ClassVar[bool] = True
    needs_teacher_features: ClassVar[bool] = False
    needs_sample_indices: ClassVar[bool] = False
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    ddp_local_buffers: ClassVar[tuple[str, ...]] = ()

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
        # A submodule (so .to() moves it), but frozen and excluded from
        # trainable_parameters() and checkpoints.
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    # -- the engine's hooks ------------------------------------------------------------
    def setup(self, context: SetupContext) -> None:
        """Called once before training (see `SetupContext`); the default does nothing."""

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:  # pragma: no cover - abstract
        """The loss terms of one training step. `epoch` counts from 1 (for warm-ups)."""
        raise NotImplementedError

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
        """State of method-owned modules and buffers (not student, not teacher)."""
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
    def forward(self, batch: Batch | Tensor, epoch: int = 1) -> Tensor | StepOutput:
        """Inference (a tensor of images): the student alone; extras are training-only.
        Training (a `Batch`): `forward_train`. Routing the training step through `forward`
        lets DistributedDataParallel wrap the whole distiller."""
        if isinstance(batch, Batch):
            return self.forward_train(batch, epoch)
        return self.student(batch)

    # -- helpers for methods -----------------------------------------------------------
    @torch.no_grad()
    def teacher_forward(self, images: Any, features: bool = False) -> Any:
        """The teacher's logits (or `(logits, Features)`) without building a graph."""
        assert self.teacher is not None
        return self.teacher(images, features=True) if features else self.teacher(images)

    def teacher_logits(self, batch: Batch) -> Tensor:
        """The batch's cached teacher logits when a cache feeds them, else a teacher forward."""
        if batch.teacher_logits is not None:
            return batch.teacher_logits
        return self.teacher_forward(batch.images)


__all__ = ["Batch", "Distiller", "SetupContext", "StepOutput", "warmup_factor"]
