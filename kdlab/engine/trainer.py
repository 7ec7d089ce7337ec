"""The training loop shared by every method and task.

`Trainer(cfg).fit()` trains `cfg.model` with `cfg.method` (from `cfg.teacher` when the method
needs one), evaluates every `train.eval_every` epochs, and stops resumable at any moment:

- the task (`kdlab.engine.tasks`) provides data, networks, batches and the metric; the method
  is reached only through its protocol (`kdlab.methods.base`); the step is `TrainStep`, the
  same object the benchmarks time; logging, checkpoints, progress, the label-noise record and
  the teacher-cache feed are callbacks (`kdlab.engine.callbacks`);
- what training has reached is a `TrainState`; it, the method's extras, optimizer, scheduler,
  scaler, RNG and stateful callbacks save and load themselves (`kdlab.engine.state`); callbacks
  are given a `RunContext`, not the trainer, and the run folder writes every run file;
- data order and augmentation are functions of (seed, epoch, sample index) only
  (`kdlab.data.sampling`), so resuming, even mid-epoch, reproduces the same batches;
- `last.pt` is written atomically at the end of every epoch, and on Ctrl-C (with the position
  inside the epoch, or the note that evaluation was under way), so nothing is lost (with the
  default `train.save: last`; `best` and `none` keep nothing to resume from);
- Ctrl-C inside a step waits for the step's end, and a Ctrl-C during a save for the save
  (`kdlab.engine.interrupts`), so what is saved is a state an uninterrupted run passes through;
- a write that fails (a full disk, a folder made read-only) stops the run with one message
  naming the file; the checkpoint written before it is intact and `--resume` continues.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from kdlab.config.loader import config_to_dict
from kdlab.schema.experiment import ExperimentConfig
from kdlab.data.sampling import sample_seed
from kdlab.engine.build import make_distiller
from kdlab.engine.callbacks import Callback, TrainMetrics, default_callbacks
from kdlab.engine.checkpoint import Checkpoint, ModelRecord, load_model_state
from kdlab.engine.device import resolve_device, share_busy_cores
from kdlab.engine.distributed import (
    DistInfo, all_reduce_sum, barrier, broadcast_buffers, convert_sync_bn, init_distributed, per_rank_batch, wrap_ddp,
)
from kdlab.engine.interrupts import InterruptGate
from kdlab.engine.optim import build_optimizer, build_scheduler
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import ResumeMismatch, RunFolder, as_experiment
from kdlab.engine.seed import seed_everything
from kdlab.engine.state import (
    MethodExtras, RNGState, RunContext, Stateful, TrainState, callback_component, load_components, save_components,
)
from kdlab.engine.step import NonFiniteMonitor, TrainStep
from kdlab.engine.tasks import Task, task_for
from kdlab.engine.teacher_cache import teacher_feed
from kdlab.errors import KDLabError, TrainingError
from kdlab.methods import Distiller
from kdlab.methods.base import SetupContext

log = logging.getLogger("kdlab")

#: Errors only a write raises (a full disk, a quota, a file size limit): such an error without
#: a file name still comes from writing a run file.
_WRITE_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

#: Shown when Ctrl-C is pressed during a checkpoint save, which then completes.
SAVING = "Ctrl-C: the checkpoint is being saved; the run stops once it is written"


@contextlib.contextmanager
def epoch_lines_shown() -> Iterator[None]:
    """`Trainer(cfg).fit()` from Python logs its epoch lines to stderr as `kdlab train` does; where
    logging is set up already (the CLI, an application, pytest), that set-up alone decides, so no
    line is shown twice."""
    if log.hasHandlers() or log.level != logging.NOTSET:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)


class Trainer:
    """Train one experiment.

    resume: True continues from `<run_dir>/last.pt`, a path from that checkpoint.
    overwrite: replace a run folder that already holds a run (without it, and without
        `resume`, such a folder is refused before anything is touched).
    callbacks: more `Callback`s, called after the built-in ones.
    folder: the run folder, already claimed by the caller (`kdlab.engine.launch.claimed`, with
        these `resume`/`overwrite`); without it the trainer claims `run_dir` (default
        `<output_dir>/<name>`) itself.

    What training has reached is `state` (`TrainState`); with the method's extras, optimizer,
    scheduler, scaler, RNG and every callback with a `key` it forms `components`, which a
    checkpoint saves and a resume restores by name (`kdlab.engine.state`).
    """

    def __init__(self, cfg: ExperimentConfig, *, resume: bool | str = False, run_dir: str | Path | None = None,
                 overwrite: bool = False, callbacks: Iterable[Callback] = (), folder: RunFolder | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.claimed = folder is not None
        if folder is not None:
            run_dir = folder.path
        self.extra_callbacks = list(callbacks)
        self.device = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
        self.folder = RunFolder(self.run_dir)
        self.is_main = self.dist.is_main
        if self.device.type == "cpu" and not self.dist.enabled:
            share_busy_cores(log)
        self.task: Task = task_for(cfg)
        self.state = TrainState()

    # What callbacks and scripts read before the state was declared.
    @property
    def best(self) -> dict[str, float]:
        return self.state.best

    @property
    def best_epoch(self) -> int:
        return self.state.best_epoch

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    @property
    def skipped(self) -> int:
        return self.state.skipped_batches

    # ------------------------------------------------------------------ set-up
    def build_distiller(self) -> Distiller:
        student, teacher = self.task.build_networks(self.cfg, self.data)
        return make_distiller(self.cfg, student, teacher, input_size=self.data.input_size,
                              num_classes=self.data.num_classes, task=self.task.name)

    def setup(self) -> None:
        cfg = self.cfg
        if not self.claimed:
            # Every rank checks (so every rank refuses alike); only the main one clears anything.
            self.folder.claim(resume=bool(self.resume), overwrite=self.overwrite, is_main=self.is_main, cfg=cfg)
        if self.is_main:
            self.folder.check_writable()
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.data = self.task.build_data(cfg)
        self.num_classes = self.data.num_classes
        self.distiller = self.build_distiller().to(self.device)
        # Before the optimizer, DDP and compile see the distiller: what setup creates is trained,
        # synchronised and checkpointed like the rest.
        self.distiller.setup(SetupContext(
            train_set=self.data.train, num_train_samples=len(self.data.train), num_classes=self.num_classes,
            train_targets=list(self.data.train_targets) or None, data_cfg=cfg.data, seed=cfg.train.seed,
            device=self.device,
            run_dir=self.run_dir if self.is_main else None, world_size=self.dist.world_size, rank=self.dist.rank,
        ))
        if cfg.train.sync_bn:  # DDP on CUDA only; see kdlab/engine/distributed.py
            self.distiller = convert_sync_bn(self.distiller, self.dist, self.device.type)
        if cfg.train.channels_last:
            self.distiller = self.distiller.to(memory_format=torch.channels_last)
        step_module: nn.Module = self.distiller
        if self.dist.enabled:
            step_module = wrap_ddp(self.distiller, self.device)
        if cfg.train.compile:
            step_module = torch.compile(step_module)
        # data.batch_size is the global batch; each process loads its share of every step.
        batch = per_rank_batch(cfg.data.batch_size, self.dist)
        eval_batch = cfg.data.eval_batch_size and max(cfg.data.eval_batch_size // self.dist.world_size, 1)
        self.train_loader = self.task.train_loader(self.data, cfg, batch_size=batch, device=self.device,
                                                   dist=self.dist)
        self.val_loader = self.task.eval_loader(self.data, cfg, batch_size=eval_batch, device=self.device,
                                                dist=self.dist)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.train.iterations or cfg.train.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / max(self.steps_per_epoch, 1)) if cfg.train.iterations \
            else cfg.train.epochs
        self.optimizer = build_optimizer(self.distiller.trainable_parameters(), cfg.optim, self.distiller)
        per_step = cfg.schedule.unit == "iteration"
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps if per_step else self.epochs)
        # fp16 gradients underflow without loss scaling on any device; bf16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.step = TrainStep(step_module, self.optimizer, self.scaler, self.device, cfg.train.amp,
                              check_grads=self.dist.enabled, grad_clip=cfg.train.grad_clip,
                              accumulate=cfg.train.accumulate)
        self.monitor = NonFiniteMonitor(self.device)
        feed = teacher_feed(cfg, self.data, self.distiller, self.device)
        self.start_epoch, self.start_batch = 1, 0
        self.run = RunContext(
            cfg=cfg, folder=self.folder, state=self.state, task=self.task, data=self.data, is_main=self.is_main,
            device=self.device, dist=self.dist, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            start_epoch=1, snapshot=self.checkpoint)
        self.callbacks = default_callbacks(self.run, feed) + self.extra_callbacks
        self.metrics = next(c for c in self.callbacks if isinstance(c, TrainMetrics))
        self.components: dict[str, Stateful] = {
            "train": self.state, "extras": MethodExtras(self.distiller), "optimizer": self.optimizer,
            "scheduler": self.scheduler, "rng": RNGState(),
            **({"scaler": self.scaler} if self.scaler.is_enabled() else {}),
            **{callback_component(c.key): c for c in self.callbacks if c.key},
        }
        self.resumed = False
        if self.resume:
            self._load_resume()
        self.run.start_epoch = self.start_epoch
        if self.is_main and not self.resumed:  # a resumed run keeps the config.yaml it started with
            self.folder.write_config(cfg)
        self._fire("on_fit_start")

    def _fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.run, *args)

    def _load_resume(self) -> None:
        path = Path(self.resume) if isinstance(self.resume, (str, Path)) else self.folder.checkpoint("last")
        if not path.is_file():
            if isinstance(self.resume, (str, Path)):
                raise KDLabError(f"--resume {str(path)!r}: no such checkpoint")
            folder = RunFolder(self.run_dir)
            if folder.holds_run():  # starting from scratch would write over it
                raise KDLabError(
                    f"--resume: {folder} holds a run ({folder.describe()}) but no last.pt to continue from "
                    f"(train.save=last keeps one; this run has train.save={self.cfg.train.save}); train it "
                    "again with --overwrite, or into another folder with name=...")
            log.info("no checkpoint at %s: starting from scratch", path)
            return
        ckpt = Checkpoint.load(path, map_location=self.device)
        if ckpt.config:  # the one "same experiment" rule, also for a checkpoint of another folder
            problem = RunFolder(self.run_dir).resume_refusal(self.cfg, saved=as_experiment(ckpt.config),
                                                             source=str(path))
            if problem:
                raise ResumeMismatch(problem)
        if ckpt.optimizer is None:
            raise KDLabError(
                f"cannot resume from {str(path)!r}: it holds the weights only (best.pt, and every checkpoint "
                "unless train.save=last); --resume needs a last.pt written with train.save=last. To start a "
                f"new run from these weights, set model.checkpoint={path}")
        if ckpt.model.name != self.cfg.model.name:
            raise KDLabError(
                f"cannot resume from {str(path)!r}: it trained {ckpt.model.name!r}, the config trains "
                f"{self.cfg.model.name!r}; use another run name or output_dir"
            )
        load_model_state(self.distiller.student, ckpt.model_state, str(path), self.cfg.model.name)
        load_components(self.components, ckpt.state, str(path))
        self.start_epoch = self.state.epoch + 1
        self.resumed = True
        if self.state.partial:
            self.start_batch = self.state.partial["batches"]
        log.info("resumed from %s at epoch %d%s", path, self.start_epoch,
                 f", batch {self.start_batch}" if ckpt.partial else "")

    def checkpoint(self, epoch: int, partial: dict | None = None) -> Checkpoint:
        """The run's state after `epoch` (and `partial`, a position inside the next epoch)."""
        cfg = self.cfg
        state = save_components(self.components)
        state["train"].update(epoch=epoch, partial=partial)
        return Checkpoint(
            model=ModelRecord(cfg.model.name, self.num_classes, dict(cfg.model.kwargs)),
            model_state=self.distiller.student.state_dict(),
            method=cfg.method.name,
            config=config_to_dict(cfg),
            class_names=list(self.data.class_names),
            state=state,
        )

    # ------------------------------------------------------------------ training
    def _check_nonfinite(self, epoch: int) -> None:
        """Read the device-side non-finite record (one host sync) and apply `train.nonfinite`."""
        count, first, terms = self.monitor.poll()
        if self.dist.enabled:  # every rank must take the same decision
            count = int(all_reduce_sum(torch.tensor([count], device=self.device), self.dist).item())
        if not count:
            return
        self.monitor.reset()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "on another rank"
        last = self.folder.checkpoint("last")
        where = f"epoch {epoch}, batch {first}" if first >= 0 else f"epoch {epoch}"
        if self.cfg.train.nonfinite == "skip":
            self.state.skipped_batches += count
            log.warning("non-finite loss at %s (%s): %d batch(es) skipped (%d so far)", where, shown, count,
                        self.state.skipped_batches)
            if self.state.skipped_batches <= self.cfg.train.max_skipped:
                return
            raise TrainingError(
                f"more than train.max_skipped={self.cfg.train.max_skipped} batches had a non-finite loss "
                f"(last at {where}: {shown}); lower optim.lr or check the data. Last good checkpoint: "
                f"{last if last.exists() else 'none yet'}"
            )
        raise TrainingError(
            f"non-finite loss at {where} ({shown}); training stopped instead of continuing on garbage (that "
            f"batch's update was not applied). Last good checkpoint: {last if last.exists() else 'none yet (first epoch)'}. "
            "Lower optim.lr, disable train.amp, or set train.nonfinite=skip to skip such batches"
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        start = self.start_batch if epoch == self.start_epoch else 0
        self.train_loader.sampler.set_epoch(epoch, start * per_rank_batch(cfg.data.batch_size, self.dist))
        if start == 0:
            # The global RNG (dropout, etc.) restarts from a per-epoch seed, so an epoch's
            # randomness does not depend on what ran before it.
            torch.manual_seed(sample_seed(cfg.train.seed, epoch, -1))
        self.distiller.train()
        batches = start
        stop_at = self.total_steps - (epoch - 1) * self.steps_per_epoch  # train.iterations ends mid-epoch
        per_step = cfg.schedule.unit == "iteration"
        # Sample indices reach only a method that declares it reads them (`needs_sample_indices`).
        needs_indices = self.distiller.needs_sample_indices
        self._fire("on_epoch_start", epoch, start)
        # Ctrl-C during a step waits for its end (a step is never split); between steps it acts at once.
        gate = InterruptGate("Ctrl-C: the run stops at the end of this step, with a checkpoint", holding=False)
        gate.install()
        try:
            for raw in self.train_loader:
                if batches >= stop_at:
                    break
                gate.hold()
                batch = self.task.to_batch(raw, self.device, channels_last=cfg.train.channels_last)
                self._fire("on_batch", batch, epoch)  # callbacks see the indices (the teacher-cache feed reads them)
                if not needs_indices:
                    batch.indices = None
                result = self.step(batch, epoch)
                if per_step:
                    self.scheduler.step()
                self.monitor.record(result, batches)
                batches += 1
                self.state.step += 1
                self._fire("on_step_end", batches, result)
                gate.release()
                if batches % cfg.train.check_every == 0:
                    self._check_nonfinite(epoch)
            self._check_nonfinite(epoch)
        except KeyboardInterrupt:
            self._interrupted(epoch, {"batches": batches, "sums": self.metrics.position_sums()})
            raise
        finally:
            gate.restore()
        return self.metrics.epoch_row(self.run)

    def _interrupted(self, epoch: int, position: dict[str, Any]) -> None:
        self._was_interrupted = True
        with InterruptGate(SAVING):  # a second Ctrl-C must not abort the save
            self._fire("on_interrupt", epoch, position)

    def _evaluate(self, epoch: int) -> dict[str, float]:
        broadcast_buffers(self.distiller.student, self.dist)  # evaluate what rank 0 saves
        try:
            return self.task.evaluate(self.distiller.student, self.val_loader, self.data, self.cfg, self.device)
        except KeyboardInterrupt:
            # The epoch's training is kept: resuming skips straight to this evaluation.
            sums = self.metrics.position_sums() if self.is_main else {}
            self._interrupted(epoch, {"batches": self.steps_per_epoch, "sums": sums, "evaluating": True})
            raise

    def fit(self) -> RunResult:
        with epoch_lines_shown():
            return self._setup_and_fit()

    def _setup_and_fit(self) -> RunResult:
        folder = self.folder
        try:
            self.setup()
        except BaseException:
            if not self.claimed:  # the caller that claimed the folder releases it
                folder.release(abandon=True)  # a run that failed before it started leaves no folder behind
            raise
        try:
            return self._fit()
        except OSError as exc:
            failure = self._write_failure(exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            if not self.claimed:
                folder.release()  # the next writer may take the folder

    def _write_failure(self, exc: OSError) -> KDLabError | None:
        """The one message of a run file that could not be written (None: `exc` is no such failure)."""
        name = exc.filename
        inside = name is not None and Path(name).resolve().is_relative_to(self.run_dir.resolve())
        if not (inside or (name is None and exc.errno in _WRITE_ONLY_ERRNOS)):
            return None
        last = self.folder.checkpoint("last")
        try:
            saved = Checkpoint.load(last)
            where = f"epoch {saved.epoch + 1}, batch {saved.partial['batches']}" if saved.partial \
                else f"epoch {saved.epoch}"
            kept = f"{last} ({where}) is intact"
        except KDLabError:
            kept = "no checkpoint was written before it"
        return KDLabError(
            f"cannot write {name or f'a file in {self.run_dir}'} ({exc.strerror or exc}); training stopped. {kept}. "
            f"Free disk space or make {self.run_dir} writable, then continue with the same command and --resume")

    def _fit(self) -> RunResult:
        cfg = self.cfg
        primary = self.task.primary_metric
        self._was_interrupted = False
        try:
            for epoch in range(self.start_epoch, self.epochs + 1):
                t0 = time.perf_counter()
                row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
                row.update(self._train_epoch(epoch))
                if epoch % cfg.train.eval_every == 0 or epoch == self.epochs:
                    metrics = self._evaluate(epoch)
                    row.update({f"val/{k}": v for k, v in metrics.items()})
                    if metrics[primary] > self.state.best.get(primary, -math.inf):
                        self.state.best = {k: metrics[k] for k in self.task.reported_metrics if k in metrics}
                        self.state.best_epoch = epoch
                else:
                    row.update({f"val/{k}": math.nan for k in (*self.task.reported_metrics, "loss")})
                if cfg.schedule.unit == "epoch":
                    self.scheduler.step()
                row[f"best_{primary}"] = self.state.best.get(primary, math.nan)
                row["skipped_batches"] = self.state.skipped_batches
                row["time_s"] = time.perf_counter() - t0
                self.state.history.append(row)
                self.state.epoch, self.state.partial = epoch, None
                self.start_batch = 0
                with InterruptGate(SAVING) as gate:  # the epoch's checkpoints are written whole
                    self._fire("on_epoch_end", epoch, row)
                if gate.pending:
                    self._was_interrupted = True
                    log.warning("interrupted at the end of epoch %d, whose checkpoint is saved; --resume continues "
                                "from there", epoch)
                    raise KeyboardInterrupt
        finally:
            self._fire("on_fit_end")
            if not self._was_interrupted:
                barrier(self.dist)
        return self._result()

    def _result(self) -> RunResult:
        last_row = self.history[-1] if self.history else {}
        last = {k: last_row.get(f"val/{k}", math.nan) for k in self.task.reported_metrics}
        result = RunResult(
            run_dir=str(self.run_dir), epochs=self.epochs,
            best_epoch=self.best_epoch, skipped_batches=self.skipped, primary_metric=self.task.primary_metric,
            headline=self.task.headline_metrics,
            last=last, best=dict(self.best), history=self.history,
        )
        trained = self.start_epoch <= self.epochs  # else a finished run resumed: it stays as it was
        if self.is_main and (trained or not RunFolder(self.run_dir).is_finished()):
            RunFolder(self.run_dir).write_result(result.to_json())
        return result


def train(cfg: ExperimentConfig, **kwargs: Any) -> RunResult:
    """Convenience wrapper: `Trainer(cfg, **kwargs).fit()`."""
    return Trainer(cfg, **kwargs).fit()


__all__ = ["RunResult", "Trainer", "train"]
