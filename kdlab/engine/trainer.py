"""The training loop shared by every method.

`Trainer(cfg).fit()` trains `cfg.model` with `cfg.method` (from `cfg.teacher` when the
method needs one), evaluates every epoch, logs each loss term, and checkpoints so that a
stopped run resumes exactly where it stopped:

- data order and augmentation are functions of (seed, epoch, sample index) only
  (`kdlab.engine.sampling`), so resuming, even mid-epoch, reproduces the same batches;
- `last.pt` is written atomically at the end of every epoch, and on Ctrl-C mid-epoch
  (with the position inside the epoch), so nothing is lost;
- `metrics.jsonl` is rewritten on resume to drop epochs after the checkpoint, so the log
  never holds an epoch twice.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdlab.config.loader import config_to_dict, dump_config
from kdlab.config.schema import ExperimentConfig
from kdlab.engine.build import build_distiller, eval_loader, train_loader
from kdlab.engine.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint, load_model_state
from kdlab.engine.distributed import (
    DistInfo, ShardSampler, all_reduce_sum, barrier, broadcast_buffers, convert_sync_bn, init_distributed,
    per_rank_batch,
)
from kdlab.engine.evaluate import autocast_context, evaluate
from kdlab.engine.optim import build_optimizer, build_scheduler
from kdlab.engine.sampling import sample_seed
from kdlab.engine.seed import rng_state, seed_everything, set_rng_state
from kdlab.errors import KDLabError, TrainingError

log = logging.getLogger("kdlab")


@dataclass
class RunResult:
    """Summary of a finished run (also written to `<run_dir>/result.json`)."""

    run_dir: str
    epochs: int
    last_top1: float
    last_top5: float
    best_top1: float
    best_top5: float
    best_epoch: int
    skipped_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDLabError(f"train.device={spec!r} but CUDA is not available here; use train.device=cpu or auto")
    return device


def check_writable(folder: Path) -> None:
    """Fail before training, not after the first epoch, when the output folder is unusable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kdlab-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise KDLabError(
            f"output folder {str(folder)!r} cannot be written ({exc.strerror or exc}); "
            "set output_dir=<a writable folder> on the command line or in the config"
        ) from None


class Trainer:
    """Train one experiment. `resume=True` continues from `<run_dir>/last.pt`;
    `resume=PATH` from that checkpoint."""

    def __init__(self, cfg: ExperimentConfig, *, resume: bool | str = False, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.device = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
        self.is_main = self.dist.is_main
        self._interrupted = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from kdlab.data import build_datasets

        cfg = self.cfg
        if self.is_main:
            check_writable(self.run_dir)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.data = build_datasets(cfg.data)
        self.num_classes = self.data.num_classes
        self.distiller = build_distiller(cfg, self.num_classes, self.data.input_size).to(self.device)
        if cfg.train.sync_bn:  # DDP on CUDA only; see kdlab/engine/distributed.py
            self.distiller = convert_sync_bn(self.distiller, self.dist, self.device.type)
        # data.batch_size is the global batch; each process loads its share of every step.
        self.batch_per_rank = per_rank_batch(cfg.data.batch_size, self.dist)
        eval_batch = cfg.data.eval_batch_size and max(cfg.data.eval_batch_size // self.dist.world_size, 1)
        data_cfg = cfg.data.model_copy(update={"batch_size": self.batch_per_rank, "eval_batch_size": eval_batch})
        if cfg.train.channels_last:
            self.distiller = self.distiller.to(memory_format=torch.channels_last)
        self.step_module: nn.Module = self.distiller
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(self.distiller, device_ids=ids)
        if cfg.train.compile:
            self.step_module = torch.compile(self.step_module)
        self.optimizer = build_optimizer(self.distiller.trainable_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.epochs)
        # fp16 gradients underflow without loss scaling on any device; bf16 needs none.
        use_scaler = cfg.train.amp == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if cfg.data.pipeline == "gpu":  # uint8 data on the device, batch-wide crop/flip (docs/speed.md)
            from kdlab.data.gpu_pipeline import gpu_loaders

            self.train_loader, self.val_loader = gpu_loaders(
                self.data, data_cfg, cfg.train.seed, self.device, channels_last=cfg.train.channels_last,
                num_replicas=self.dist.world_size, rank=self.dist.rank,
            )
        else:
            self.train_loader = train_loader(
                self.data.train, data_cfg, cfg.train.seed, self.device.type,
                num_replicas=self.dist.world_size, rank=self.dist.rank,
            )
            # Each rank evaluates its own shard; evaluate() sums the metrics over ranks.
            shard = ShardSampler(len(self.data.val), self.dist) if self.dist.enabled else None
            self.val_loader = eval_loader(self.data.val, data_cfg, self.device.type, sampler=shard)
        from kdlab.engine.teacher_cache import teacher_feed

        # teacher.cache: cached teacher logits of each drawn view replace the teacher forward.
        self.teacher_feed = teacher_feed(cfg, self.data, self.distiller, self.device)
        from kdlab.experiments.hooks import on_setup

        on_setup(self)  # label-noise record beside the run; a method's one-off prepare() (dkd_split)
        self.start_epoch = 1
        self.start_batch = 0
        self.partial_sums: dict[str, float] | None = None
        self.best_top1, self.best_top5, self.best_epoch = -1.0, 0.0, 0
        self.skipped = 0
        self.history: list[dict[str, Any]] = []
        if self.resume:
            self._load_resume()
        if self.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
            self._rewrite_metrics()
        self.writer = None
        if self.is_main and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.start_epoch)

    def _load_resume(self) -> None:
        path = Path(self.resume) if isinstance(self.resume, (str, Path)) else self.run_dir / "last.pt"
        if not path.is_file():
            if isinstance(self.resume, (str, Path)):
                raise KDLabError(f"--resume {str(path)!r}: no such checkpoint")
            log.info("no checkpoint at %s: starting from scratch", path)
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        saved = ckpt.get("model", {}).get("name")
        if saved != self.cfg.model.name:
            raise KDLabError(
                f"cannot resume from {str(path)!r}: it trained {saved!r}, the config trains "
                f"{self.cfg.model.name!r}; use another run name or output_dir"
            )
        load_model_state(self.distiller.student, ckpt["model_state"], str(path), self.cfg.model.name)
        self.distiller.load_extra_state_dict(ckpt.get("extra_state", {}))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.best_top1 = ckpt["best_top1"]
        self.best_top5 = ckpt.get("best_top5", 0.0)
        self.best_epoch = ckpt["best_epoch"]
        self.skipped = ckpt.get("skipped_batches", 0)
        self.history = list(ckpt.get("history", []))
        self.start_epoch = ckpt["epoch"] + 1
        partial = ckpt.get("partial")
        if partial:
            self.start_batch = partial["batches"]
            self.partial_sums = partial["sums"]
            set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d%s", path, self.start_epoch,
                 f", batch {self.start_batch}" if partial else "")

    # ------------------------------------------------------------------ logging
    def _metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _rewrite_metrics(self) -> None:
        """Keep exactly the epochs before `start_epoch` (drops any logged after the checkpoint)."""
        path = self._metrics_path()
        kept = [json.dumps(row) for row in self.history if row["epoch"] < self.start_epoch]
        path.write_text("".join(line + "\n" for line in kept))

    def _log_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        with self._metrics_path().open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        terms = " ".join(f"{k[6:]}={v:.4f}" for k, v in row.items() if k.startswith("train/") and k != "train/top1")
        log.info(
            "epoch %d/%d  lr %.4g  %s  train top1 %.2f  val top1 %.2f top5 %.2f  (best %.2f @%d)  %.1fs",
            row["epoch"], self.cfg.train.epochs, row["lr"], terms, row["train/top1"],
            row["val/top1"], row["val/top5"], self.best_top1, self.best_epoch, row["time_s"],
        )

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int, partial: dict | None = None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": self.cfg.model.name, "num_classes": self.num_classes,
                      "kwargs": dict(self.cfg.model.kwargs)},
            "model_state": self.distiller.student.state_dict(),
            "extra_state": self.distiller.extra_state_dict(),
            "method": self.cfg.method.name,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "best_epoch": self.best_epoch,
            "skipped_batches": self.skipped,
            "history": self.history,
            "rng": rng_state(),
            "partial": partial,
            "config": config_to_dict(self.cfg),
            "class_names": list(self.data.class_names),
        }

    def _save(self, epoch: int, improved: bool) -> None:
        if not self.is_main:
            return
        ckpt = self._checkpoint(epoch)
        atomic_save(ckpt, self.run_dir / "last.pt")
        if improved:
            atomic_save(ckpt, self.run_dir / "best.pt")
        every = self.cfg.train.save_every
        if every and epoch % every == 0:
            atomic_save(ckpt, self.run_dir / f"epoch_{epoch}.pt")

    # ------------------------------------------------------------------ training
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        start = self.start_batch if epoch == self.start_epoch else 0
        self.train_loader.sampler.set_epoch(epoch, start * self.batch_per_rank)
        if start == 0:
            # The global RNG (dropout, etc.) restarts from a per-epoch seed, so an epoch's
            # randomness does not depend on what ran before it.
            torch.manual_seed(sample_seed(cfg.train.seed, epoch, -1))
        self.distiller.train()
        sums: dict[str, Tensor] = {}
        if start and self.partial_sums and self.is_main:  # saved sums are rank 0's alone
            sums = {k: torch.tensor(v, device=self.device, dtype=torch.float64) for k, v in self.partial_sums.items()}
        batches = start
        total = len(self.train_loader) + start
        bar = tqdm(self.train_loader, total=total, initial=start, desc=f"epoch {epoch}",
                   disable=not (cfg.train.progress and self.is_main), leave=False, dynamic_ncols=True)
        try:
            for batch in bar:  # (images, targets, indices[, views]); views from data.pipeline=gpu
                images = batch[0].to(self.device, non_blocking=True)
                targets = batch[1].to(self.device, non_blocking=True)
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                cached = {}
                if self.teacher_feed is not None:
                    cached["teacher_logits"] = self.teacher_feed.logits(batch, epoch)
                if getattr(self.distiller, "needs_indices", False):  # dkd_split's global split
                    cached["indices"] = batch[2].to(self.device, non_blocking=True)
                with autocast_context(self.device, cfg.train.amp):
                    out = self.step_module(images, targets, epoch=epoch, **cached)
                loss = sum(out.losses.values())
                if not torch.isfinite(loss):
                    self._nonfinite(epoch, batches, out.losses)
                    batches += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                n = targets.numel()
                with torch.no_grad():
                    acc = (out.logits.argmax(1) == targets).sum()
                    named = [("train/loss", loss)]
                    named += [(f"train/{k}", v) for k, v in out.losses.items()]
                    named += [(f"stat/{k}", v) for k, v in out.stats.items()]
                    for key, value in named:
                        sums[key] = sums.get(key, 0) + value.detach().double() * n
                    sums["correct"] = sums.get("correct", 0) + acc.double()
                    sums["count"] = sums.get("count", 0) + n
                batches += 1
                if batches % 10 == 0 and bar.disable is False:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        except KeyboardInterrupt:
            self._interrupted = True
            if self.is_main:
                sums_f = {k: float(v) for k, v in sums.items()}
                atomic_save(self._checkpoint(epoch - 1, {"batches": batches, "sums": sums_f}), self.run_dir / "last.pt")
                log.warning("interrupted at epoch %d batch %d: saved %s; resume with --resume",
                            epoch, batches, self.run_dir / "last.pt")
            raise
        finally:
            bar.close()
        keys = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[k], device=self.device, dtype=torch.float64) for k in keys]) if keys else None
        if packed is not None:
            all_reduce_sum(packed, self.dist)
        totals = dict(zip(keys, packed.tolist())) if packed is not None else {}
        count = max(totals.pop("count", 0.0), 1.0)
        correct = totals.pop("correct", 0.0)
        row = {k: v / count for k, v in totals.items()}
        row["train/top1"] = 100.0 * correct / count
        return row

    def _nonfinite(self, epoch: int, batch: int, losses: dict[str, Tensor]) -> None:
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        last = self.run_dir / "last.pt"
        where = f"epoch {epoch}, batch {batch}"
        if self.cfg.train.nonfinite == "skip":
            self.skipped += 1
            log.warning("non-finite loss at %s (%s): batch skipped (%d so far)", where, terms, self.skipped)
            if self.skipped <= self.cfg.train.max_skipped:
                return
            raise TrainingError(
                f"more than train.max_skipped={self.cfg.train.max_skipped} batches had a non-finite loss "
                f"(last at {where}: {terms}); lower optim.lr or check the data. Last good checkpoint: "
                f"{last if last.exists() else 'none yet'}"
            )
        raise TrainingError(
            f"non-finite loss at {where} ({terms}); training stopped instead of continuing on garbage. "
            f"Last good checkpoint: {last if last.exists() else 'none yet (first epoch)'}. "
            "Lower optim.lr, disable train.amp, or set train.nonfinite=skip to skip such batches"
        )

    def fit(self) -> RunResult:
        self.setup()
        cfg = self.cfg
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs + 1):
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                row: dict[str, Any] = {"epoch": epoch, "lr": lr}
                row.update(self._train_epoch(epoch))
                self.scheduler.step()
                improved = False
                if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
                    broadcast_buffers(self.distiller.student, self.dist)  # evaluate what rank 0 saves
                    metrics = evaluate(self.distiller.student, self.val_loader, self.num_classes,
                                       self.device, cfg.train.amp, cfg.train.channels_last)
                    row.update({f"val/{k}": v for k, v in metrics.items()})
                    improved = metrics["top1"] > self.best_top1
                    if improved:
                        self.best_top1, self.best_top5, self.best_epoch = metrics["top1"], metrics["top5"], epoch
                else:
                    row.update({"val/top1": math.nan, "val/top5": math.nan, "val/loss": math.nan})
                row["best_top1"] = self.best_top1
                row["skipped_batches"] = self.skipped
                row["time_s"] = time.perf_counter() - t0
                self._log_epoch(row)
                self._save(epoch, improved)
                self.start_batch = 0
        finally:
            if self.writer is not None:
                self.writer.close()
            if not self._interrupted:
                barrier(self.dist)
        last = self.history[-1] if self.history else {}
        result = RunResult(
            run_dir=str(self.run_dir), epochs=cfg.train.epochs,
            last_top1=last.get("val/top1", math.nan), last_top5=last.get("val/top5", math.nan),
            best_top1=self.best_top1, best_top5=self.best_top5, best_epoch=self.best_epoch,
            skipped_batches=self.skipped, history=self.history,
        )
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result


def train(cfg: ExperimentConfig, **kwargs: Any) -> RunResult:
    """Convenience wrapper: `Trainer(cfg, **kwargs).fit()`."""
    return Trainer(cfg, **kwargs).fit()
