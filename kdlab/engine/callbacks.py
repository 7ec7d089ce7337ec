"""Callbacks: what the trainer does around the training step, one small object each.

A `Callback` overrides the hooks it needs; the trainer calls every callback's hook in order.
Every hook receives `run`, a `kdlab.engine.state.RunContext`: the config, the run folder
(`RunFolder`, which writes every run file), the `TrainState` (epoch, best, history, ...), the
task and data, `is_main`, `epochs`, `steps_per_epoch`, `start_epoch`, and `snapshot(epoch,
partial)`, the run's checkpoint; never the trainer itself. A callback with state that a resumed
run needs sets `key` and returns that state from `state_dict()`: it is a component of the run
(`callback/<key>` in a checkpoint's `state`) and gets it back through `load_state_dict()`.

Hooks, in the order they fire:

    on_fit_start(run)                        after set-up and resume, before the first epoch
    on_epoch_start(run, epoch, start)        `start`: the batch the epoch resumes at
    on_batch(run, batch, epoch)              before the step: may fill fields of the `Batch`
    on_step_end(run, batch_number, result)   after the optimizer step (`StepResult`)
    on_epoch_end(run, epoch, row)            after evaluation; `row` is the epoch's metrics
    on_interrupt(run, epoch, position)       Ctrl-C; `position` says where the epoch stopped
    on_fit_end(run)                          always, also after an error or Ctrl-C

The built-in ones (`default_callbacks`): the label-noise record, the teacher-cache feed, the
epoch's training metrics (`TrainMetrics`), the progress bar, metrics and TensorBoard logging,
and checkpointing (with the mid-epoch Ctrl-C save).
A user passes more with `Trainer(cfg, callbacks=[...])`.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdlab.data.noise_record import write_noise_record
from kdlab.engine.distributed import all_reduce_sum
from kdlab.methods.base import Batch

if TYPE_CHECKING:  # type hints only
    from kdlab.engine.state import RunContext
    from kdlab.engine.step import StepResult

log = logging.getLogger("kdlab")


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    #: Name of this callback's entry in a checkpoint's `callbacks` (stateful callbacks only).
    key: ClassVar[str | None] = None

    def on_fit_start(self, run: "RunContext") -> None: ...
    def on_epoch_start(self, run: "RunContext", epoch: int, start: int) -> None: ...
    def on_batch(self, run: "RunContext", batch: Batch, epoch: int) -> None: ...
    def on_step_end(self, run: "RunContext", batch_number: int, result: "StepResult") -> None: ...
    def on_epoch_end(self, run: "RunContext", epoch: int, row: dict[str, Any]) -> None: ...
    def on_interrupt(self, run: "RunContext", epoch: int, position: dict[str, Any]) -> None: ...
    def on_fit_end(self, run: "RunContext") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainMetrics(Callback):
    """The epoch's training metrics: the loss, every loss term and statistic (weighted by batch
    size) and, when the method returns logits, the top-1; batches whose update was skipped (a
    non-finite loss) are left out. Sums stay on the device during the epoch (no host
    synchronisation per step); `epoch_row` reads them once, summed over the processes."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self._batch: Batch | None = None

    def on_epoch_start(self, run: "RunContext", epoch: int, start: int) -> None:
        self.sums = {}
        partial = run.state.partial
        if start and partial and run.is_main:  # saved sums are rank 0's alone
            self.sums = {k: torch.tensor(v, device=run.device, dtype=torch.float64)
                         for k, v in partial["sums"].items()}

    def on_batch(self, run: "RunContext", batch: Batch, epoch: int) -> None:
        self._batch = batch

    def on_step_end(self, run: "RunContext", batch_number: int, result: "StepResult") -> None:
        batch, sums = self._batch, self.sums
        with torch.no_grad():
            keep = result.finite
            n = torch.where(keep, float(batch.size), 0.0).double()
            named = [("train/loss", result.loss)]
            named += [(f"train/{k}", v) for k, v in result.out.losses.items()]
            named += [(f"stat/{k}", v) for k, v in result.out.stats.items()]
            for key, value in named:
                sums[key] = sums.get(key, 0) + torch.where(keep, value.detach().double(), 0.0) * n
            if result.out.logits is not None:
                hits = (result.out.logits.argmax(1) == batch.targets).sum().double()
                sums["correct"] = sums.get("correct", 0) + torch.where(keep, hits, 0.0)
            sums["count"] = sums.get("count", 0) + n

    def position_sums(self) -> dict[str, float]:
        """The sums so far, for a mid-epoch checkpoint (a host synchronisation: at a Ctrl-C only)."""
        return {k: float(v) for k, v in self.sums.items()}

    def epoch_row(self, run: "RunContext") -> dict[str, float]:
        """The epoch's means over every process: {"train/loss", "train/<term>", "stat/<name>", "train/top1"}."""
        self._batch = None
        keys = sorted(self.sums)
        if not keys:
            return {}
        packed = torch.stack([torch.as_tensor(self.sums[k], device=run.device, dtype=torch.float64) for k in keys])
        all_reduce_sum(packed, run.dist)
        totals = dict(zip(keys, packed.tolist()))
        count = max(totals.pop("count", 0.0), 1.0)
        correct = totals.pop("correct", None)
        row = {k: v / count for k, v in totals.items()}
        if correct is not None:
            row["train/top1"] = 100.0 * correct / count
        return row


class MetricsLogger(Callback):
    """`metrics.jsonl` (one line per epoch), TensorBoard scalars and the epoch's log line.

    On resume the file is rewritten to the epochs before the checkpoint, so the log never
    holds an epoch twice."""

    def __init__(self, tensorboard: bool = True) -> None:
        self.tensorboard = tensorboard
        self.writer = None

    def on_fit_start(self, run: "RunContext") -> None:
        if not run.is_main:
            return
        run.folder.reset_metrics([row for row in run.state.history if row["epoch"] < run.start_epoch])
        if self.tensorboard:
            # lazy: TensorBoard is slow to import and needed only with train.tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.folder.tb_dir), purge_step=run.start_epoch)

    def on_epoch_end(self, run: "RunContext", epoch: int, row: dict[str, Any]) -> None:
        if not run.is_main:
            return
        run.folder.append_metrics(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        primary = run.task.primary_metric
        terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in row.items() if k.startswith("train/") and k != "train/top1")
        # NaN: not evaluated this epoch (train.eval_every), or a metric that does not apply (mask AP
        # of a box-only detector, AP of an object size the validation set lacks).
        shown = " ".join(f"{k[4:]} {v:.2f}" for k, v in row.items()
                         if k.startswith("val/") and k != "val/loss" and not math.isnan(v)) or "-"
        train_acc = f"  train top1 {row['train/top1']:.2f}" if "train/top1" in row else ""
        log.info("epoch %d/%d  lr %.4g  %s%s  val %s  (best %s %.2f @%d)  %.1fs", epoch, run.epochs,
                 row["lr"], terms, train_acc, shown, primary, run.state.best.get(primary, float("nan")),
                 run.state.best_epoch, row["time_s"])

    def on_fit_end(self, run: "RunContext") -> None:
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

    def on_epoch_end(self, run: "RunContext", epoch: int, row: dict[str, Any]) -> None:
        if not run.is_main or self.save == "none":
            return
        ckpt = run.snapshot(epoch, None)
        weights = ckpt.weights_only()
        resumable = self.save == "last"
        # last.pt last: when a write fails (a full disk), last.pt still names the epoch before,
        # so --resume redoes this epoch and rewrites best.pt and epoch_N.pt too.
        if run.state.best_epoch == epoch:
            run.folder.save_checkpoint(weights, "best")
        if self.save_every and epoch % self.save_every == 0:
            run.folder.save_checkpoint(ckpt if resumable else weights, epoch)
        if resumable:
            run.folder.save_checkpoint(ckpt, "last")

    def on_interrupt(self, run: "RunContext", epoch: int, position: dict[str, Any]) -> None:
        if not run.is_main:
            return
        if self.save != "last":
            log.warning("interrupted in epoch %d: train.save=%s keeps no resumable checkpoint, so this run "
                        "cannot be continued (train.save=last keeps one)", epoch, self.save)
            return
        path = run.folder.save_checkpoint(run.snapshot(epoch - 1, position), "last")
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

    def on_epoch_start(self, run: "RunContext", epoch: int, start: int) -> None:
        if run.is_main and bars_wanted(self.enabled):
            self.bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch}", leave=False,
                            dynamic_ncols=True)

    def on_step_end(self, run: "RunContext", batch_number: int, result: "StepResult") -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if batch_number % self.every == 0:
            self.bar.set_postfix(loss=f"{float(result.loss):.3f}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, run: "RunContext", epoch: int, row: dict[str, Any]) -> None:
        self._close()

    def on_interrupt(self, run: "RunContext", epoch: int, position: dict[str, Any]) -> None:
        self._close()

    def on_fit_end(self, run: "RunContext") -> None:
        self._close()


class LabelNoiseRecord(Callback):
    """Writes `label_noise.json` and `noisy_labels.npy` beside a run with noisy labels."""

    def on_fit_start(self, run: "RunContext") -> None:
        cfg = run.cfg
        if run.is_main and run.data.train_targets:
            teacher_ckpt = cfg.teacher.checkpoint if cfg.teacher is not None else None
            write_noise_record(run.folder.path, cfg.data, run.data.train, run.data.train_targets, teacher_ckpt)


class TeacherCacheFeed(Callback):
    """Fills `Batch.teacher_logits` from a teacher-output cache (`teacher.cache`): the
    fp16-rounded logits of exactly the views each batch drew, instead of a teacher forward."""

    def __init__(self, feed: Any) -> None:
        self.feed = feed

    def on_batch(self, run: "RunContext", batch: Batch, epoch: int) -> None:
        batch.teacher_logits = self.feed.logits(batch.indices, batch.extras.get("views"), epoch)


def default_callbacks(run: "RunContext", feed: Any | None) -> list[Callback]:
    """The callbacks every run has (the teacher feed when `teacher.cache` is set); `TrainMetrics`
    comes before any callback that may stop the run after a step, so that step is counted."""
    train = run.cfg.train
    callbacks: list[Callback] = [LabelNoiseRecord()]
    if feed is not None:
        callbacks.append(TeacherCacheFeed(feed))
    callbacks += [TrainMetrics(), ProgressBar(train.progress, train.check_every), MetricsLogger(train.tensorboard),
                  Checkpointer(train.save_every, train.save)]
    return callbacks


__all__ = [
    "Callback", "Checkpointer", "LabelNoiseRecord", "MetricsLogger", "ProgressBar", "TeacherCacheFeed",
    "TrainMetrics", "bars_wanted", "default_callbacks",
]
