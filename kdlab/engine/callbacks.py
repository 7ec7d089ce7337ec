"""Callbacks: what the trainer does around the training step, one small object each.

A `Callback` overrides the hooks it needs; the trainer calls every callback's hook in order.
A callback with state that a resumed run needs returns it from `state_dict()`; checkpoints
store it under the callback's `key` and hand it back through `load_state_dict()`.

Hooks, in the order they fire:

    on_fit_start(trainer)                        after set-up and resume, before the first epoch
    on_epoch_start(trainer, epoch, start)        `start`: the batch the epoch resumes at
    on_batch(trainer, batch, epoch)              before the step: may fill fields of the `Batch`
    on_step_end(trainer, batch_number, result)   after the optimizer step (`StepResult`)
    on_epoch_end(trainer, epoch, row)            after evaluation; `row` is the epoch's metrics
    on_interrupt(trainer, epoch, position)       Ctrl-C; `position` says where the epoch stopped
    on_fit_end(trainer)                          always, also after an error or Ctrl-C

The built-in ones (`default_callbacks`): metrics and TensorBoard logging, checkpointing (with
the mid-epoch Ctrl-C save), the progress bar, the label-noise record and the teacher-cache feed.
A user passes more with `Trainer(cfg, callbacks=[...])`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm.auto import tqdm

from kdlab.data.noise_record import write_noise_record
from kdlab.methods.base import Batch

if TYPE_CHECKING:  # type hints only; the trainer imports this module
    from kdlab.engine.step import StepResult
    from kdlab.engine.trainer import Trainer

log = logging.getLogger("kdlab")


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    #: Name of this callback's entry in a checkpoint's `callbacks` (stateful callbacks only).
    key: ClassVar[str | None] = None

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int, start: int) -> None: ...
    def on_batch(self, trainer: "Trainer", batch: Batch, epoch: int) -> None: ...
    def on_step_end(self, trainer: "Trainer", batch_number: int, result: "StepResult") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict[str, Any]) -> None: ...
    def on_interrupt(self, trainer: "Trainer", epoch: int, position: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MetricsLogger(Callback):
    """`metrics.jsonl` (one line per epoch), TensorBoard scalars and the epoch's log line.

    On resume the file is rewritten to the epochs before the checkpoint, so the log never
    holds an epoch twice."""

    def __init__(self, tensorboard: bool = True) -> None:
        self.tensorboard = tensorboard
        self.writer = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not trainer.is_main:
            return
        kept = [json.dumps(row) for row in trainer.history if row["epoch"] < trainer.start_epoch]
        (trainer.run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
        if self.tensorboard:
            # lazy: TensorBoard is slow to import and needed only with train.tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.run_dir / "tb"), purge_step=trainer.start_epoch)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        with (trainer.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        primary = trainer.task.primary_metric
        terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in row.items() if k.startswith("train/") and k != "train/top1")
        # NaN: not evaluated this epoch (train.eval_every), or a metric that does not apply (mask AP
        # of a box-only detector, AP of an object size the validation set lacks).
        shown = " ".join(f"{k[4:]} {v:.2f}" for k, v in row.items()
                         if k.startswith("val/") and k != "val/loss" and not math.isnan(v)) or "-"
        train_acc = f"  train top1 {row['train/top1']:.2f}" if "train/top1" in row else ""
        log.info("epoch %d/%d  lr %.4g  %s%s  val %s  (best %s %.2f @%d)  %.1fs", epoch, trainer.epochs,
                 row["lr"], terms, train_acc, shown, primary, trainer.best.get(primary, float("nan")),
                 trainer.best_epoch, row["time_s"])

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Checkpointer(Callback):
    """The checkpoints of `train.save`, all written atomically.

    - `last` (default): `last.pt` every epoch with everything `--resume` needs (optimizer,
      scheduler, RNG, ...; on Ctrl-C also where the epoch stopped, so `--resume` continues from
      that very batch), and `best.pt` with the weights only when the primary metric improved.
    - `best`: `best.pt`, weights only; nothing to resume from.
    - `none`: no checkpoint.

    `epoch_N.pt` every `train.save_every` epochs: as `last.pt` under `last`, else weights only."""

    def __init__(self, save_every: int = 0, save: str = "last") -> None:
        self.save_every, self.save = save_every, save

    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict[str, Any]) -> None:
        if not trainer.is_main or self.save == "none":
            return
        ckpt = trainer.checkpoint(epoch)
        weights = ckpt.weights_only()
        resumable = self.save == "last"
        # last.pt last: when a write fails (a full disk), last.pt still names the epoch before,
        # so --resume redoes this epoch and rewrites best.pt and epoch_N.pt too.
        if trainer.best_epoch == epoch:
            weights.save(trainer.run_dir / "best.pt")
        if self.save_every and epoch % self.save_every == 0:
            (ckpt if resumable else weights).save(trainer.run_dir / f"epoch_{epoch}.pt")
        if resumable:
            ckpt.save(trainer.run_dir / "last.pt")

    def on_interrupt(self, trainer: "Trainer", epoch: int, position: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        if self.save != "last":
            log.warning("interrupted in epoch %d: train.save=%s keeps no resumable checkpoint, so this run "
                        "cannot be continued (train.save=last keeps one)", epoch, self.save)
            return
        path = trainer.run_dir / "last.pt"
        trainer.checkpoint(epoch - 1, partial=position).save(path)
        where = "during evaluation" if position.get("evaluating") else f"at batch {position['batches']}"
        log.warning("interrupted in epoch %d %s: saved %s; --resume continues from there%s", epoch, where, path,
                    " (training of the epoch is kept, its evaluation re-runs)" if position.get("evaluating") else "")


def bars_wanted(enabled: bool = True) -> bool:
    """Whether to draw progress bars: asked for (`train.progress`), stderr is a terminal (in a
    log file a bar is a stream of carriage-return lines; the epoch's log line stays), and the
    `kdlab` log shows INFO (`kdlab -q` asks for warnings and errors only)."""
    return enabled and sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


class ProgressBar(Callback):
    """A tqdm bar per epoch on the main process when `bars_wanted`; the running loss is shown
    every `train.check_every` steps (reading it is a host synchronisation)."""

    def __init__(self, enabled: bool, every: int) -> None:
        self.enabled, self.every = enabled, every
        self.bar = None

    def on_epoch_start(self, trainer: "Trainer", epoch: int, start: int) -> None:
        if trainer.is_main and bars_wanted(self.enabled):
            self.bar = tqdm(total=trainer.steps_per_epoch, initial=start, desc=f"epoch {epoch}", leave=False,
                            dynamic_ncols=True)

    def on_step_end(self, trainer: "Trainer", batch_number: int, result: "StepResult") -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if batch_number % self.every == 0:
            self.bar.set_postfix(loss=f"{float(result.loss):.3f}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, trainer: "Trainer", epoch: int, row: dict[str, Any]) -> None:
        self._close()

    def on_interrupt(self, trainer: "Trainer", epoch: int, position: dict[str, Any]) -> None:
        self._close()

    def on_fit_end(self, trainer: "Trainer") -> None:
        self._close()


class LabelNoiseRecord(Callback):
    """Writes `label_noise.json` and `noisy_labels.npy` beside a run with noisy labels."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        cfg = trainer.cfg
        if trainer.is_main and trainer.data.train_targets:
            teacher_ckpt = cfg.teacher.checkpoint if cfg.teacher is not None else None
            write_noise_record(trainer.run_dir, cfg.data, trainer.data.train, trainer.data.train_targets, teacher_ckpt)


class TeacherCacheFeed(Callback):
    """Fills `Batch.teacher_logits` from a teacher-output cache (`teacher.cache`): the
    fp16-rounded logits of exactly the views each batch drew, instead of a teacher forward."""

    def __init__(self, feed: Any) -> None:
        self.feed = feed

    def on_batch(self, trainer: "Trainer", batch: Batch, epoch: int) -> None:
        batch.teacher_logits = self.feed.logits(batch.indices, batch.extras.get("views"), epoch)


def default_callbacks(trainer: "Trainer", feed: Any | None) -> list[Callback]:
    """The callbacks every run has (the teacher feed when `teacher.cache` is set)."""
    train = trainer.cfg.train
    callbacks: list[Callback] = [LabelNoiseRecord()]
    if feed is not None:
        callbacks.append(TeacherCacheFeed(feed))
    callbacks += [ProgressBar(train.progress, train.check_every), MetricsLogger(train.tensorboard),
                  Checkpointer(train.save_every, train.save)]
    return callbacks


__all__ = [
    "Callback", "Checkpointer", "LabelNoiseRecord", "MetricsLogger", "ProgressBar", "TeacherCacheFeed",
    "bars_wanted", "default_callbacks",
]
