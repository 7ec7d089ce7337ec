"""`dkd_split`: NCKD on only part of the training samples (DKD paper, Table 5).

The DKD paper ranks the training samples by the teacher's target confidence p_t^T and
applies NCKD to one half only: the top half (well-predicted samples, where classic KD
suppresses NCKD by 1 - p_t^T) transfers more than the bottom half. The loss is

    ce_weight * CE(z^S, y)                          on every sample
  + warmup * beta * NCKD                            on the selected samples only
  [+ warmup * alpha * TCKD                          per `tckd`: none | all | selected]

Settings (everything PAPERS.md does not pin down is a setting, documented in
docs/experiments.md):

- `half`: top | bottom; `fraction` (0.5): the share of samples selected, floor(fraction * N).
- `split`: `global` (default, the paper's reading: rank every training sample once, before
  training, with one teacher pass; membership follows the sample index, so a sample keeps its
  side whatever its augmentation) or `batch` (rank within each batch: exactly floor(fraction *
  batch) samples of every batch, no pre-pass).
- `rank_view` (global only): `plain` (default: the un-augmented training image, a property of
  the sample) or `augmented` (the view the epoch-0 augmentation draws).
- `rank_temperature` (1.0): the temperature of the p_t^T used for ranking (the plain softmax
  confidence; the loss itself uses `temperature`).
- `tckd` (none): the paper's Table 5 setting for TCKD is not in PAPERS.md; `none` follows
  Table 1's "NCKD alone" (CE + NCKD), `all` adds alpha * TCKD on every sample, `selected` on the
  selected samples only.
- `normalize` (batch): NCKD summed over the selected samples and divided by the batch size, so a
  selected sample weighs what it weighs in NCKD on all samples; `selected` divides by the number
  selected instead (the mean over the half).
- `beta` (1.0): Table 1's weight for NCKD alone.

Ties in the ranking are broken by position (stable sort), so selection is deterministic.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt
from torch import Tensor
from torch.utils.data import DataLoader

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.data import build_datasets
from kdlab.data.loading import resolve_workers
from kdlab.data.sampling import SeededDataset
from kdlab.errors import TrainingError
from kdlab.losses import cross_entropy, dkd_terms
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, SetupContext, StepOutput, warmup_factor
from kdlab.losses.kd import teacher_target_confidence

log = logging.getLogger("kdlab")

SPLIT_RECORD = "nckd_split.json"
SPLIT_INDICES = "nckd_split_indices.npy"


class DKDSplitConfig(MethodConfig):
    name: Literal["dkd_split"] = "dkd_split"
    ce_weight: NonNegativeFloat = 1.0
    alpha: NonNegativeFloat = 1.0
    beta: NonNegativeFloat = 1.0
    temperature: Temperature = 4.0
    warmup_epochs: NonNegativeInt = 20
    half: Literal["top", "bottom"] = "top"
    fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    split: Literal["global", "batch"] = "global"
    rank_view: Literal["plain", "augmented"] = "plain"
    rank_temperature: Temperature = 1.0
    tckd: Literal["none", "all", "selected"] = "none"
    normalize: Literal["batch", "selected"] = "batch"


def target_confidence(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample p_t = softmax(z / T)_t (float32, detached): the ranking score."""
    z = logits.detach().float() / temperature
    return z.log_softmax(1).gather(1, targets.long()[:, None]).squeeze(1).exp()


def select_fraction(scores: Tensor, fraction: float, half: str) -> Tensor:
    """Bool mask of the floor(fraction * N) highest (`half='top'`) or lowest (`'bottom'`)
    scores; ties keep their order (stable sort), so the mask is deterministic."""
    n = scores.shape[0]
    k = math.floor(fraction * n + 1e-9)
    order = torch.sort(scores, descending=(half == "top"), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask


def masked_mean(values: Tensor, mask: Tensor, normalize: str) -> Tensor:
    """Sum of `values` where `mask`, divided by the batch size (`normalize='batch'`) or by the
    number selected (`'selected'`; 0 when nothing is selected)."""
    total = (values * mask.to(values.dtype)).sum()
    if normalize == "selected":
        return total / mask.sum().clamp_min(1).to(values.dtype)
    return total / max(values.shape[0], 1)


class _EpochZeroView(torch.utils.data.Dataset):
    """Item i of a `SeededDataset` as augmented in epoch 0 (for `rank_view: augmented`)."""

    def __init__(self, seeded: Any) -> None:
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.seeded)

    def __getitem__(self, i: int):
        return self.seeded[(0, i)]


@register_method("dkd_split")
class DKDSplit(Distiller):
    """CE on all samples, NCKD on the top or bottom share by teacher confidence (DKD Table 5)."""

    Config = DKDSplitConfig
    needs_sample_indices = True  # the global split is keyed by sample index

    def __init__(self, student, teacher, cfg: DKDSplitConfig, **kwargs: Any) -> None:
        super().__init__(student, teacher, cfg, **kwargs)
        # Selected-sample mask over the training set (global split); recomputed by setup()
        # at every start, so not part of the checkpoint.
        self.register_buffer("selected", torch.zeros(0, dtype=torch.bool), persistent=False)

    # ------------------------------------------------------------------ global split
    @torch.no_grad()
    def rank_training_set(self, dataset: Any, data_cfg: Any, device: torch.device) -> Tensor:
        """The teacher's p_t (at `rank_temperature`) of every sample of `dataset`, in order."""
        cfg: DKDSplitConfig = self.cfg  # type: ignore[assignment]
        scores = []
        batch_size = data_cfg.eval_batch_size or max(data_cfg.batch_size, 128)
        for batch in DataLoader(dataset, batch_size=batch_size,
                                num_workers=resolve_workers(data_cfg.num_workers, device.type)):
            images, targets = batch[0].to(device), batch[1].to(device)
            scores.append(target_confidence(self.teacher_forward(images), targets, cfg.rank_temperature).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def setup(self, context: SetupContext) -> None:
        """Rank the training set once (global split) and write the selection beside the run."""
        train_set, data_cfg, seed = context.train_set, context.data_cfg, context.seed
        device, run_dir = context.device, context.run_dir
        cfg: DKDSplitConfig = self.cfg  # type: ignore[assignment]
        if cfg.split != "global":
            return
        if self.teacher is None:
            raise TrainingError(
                "method dkd_split with method.split=global ranks the training set with the teacher, "
                "but no teacher network is loaded (teacher-output cache?); set teacher.cache=null or "
                "use method.split=batch"
            )
        if data_cfg is None:
            raise TrainingError(
                "method dkd_split with method.split=global ranks the training set, but setup was given no "
                "data config (SetupContext.data_cfg) to read it with; pass one, or use method.split=batch"
            )
        if cfg.rank_view == "plain":
            plain = build_datasets(data_cfg.model_copy(update={"augment": "none"}))
            if list(plain.train_targets) != [int(t) for t in getattr(train_set, "targets", plain.train_targets)]:
                raise TrainingError("dkd_split: the un-augmented training set does not match the training set "
                                    "(different labels or order); use method.rank_view=augmented")
            dataset = plain.train
        else:
            dataset = _EpochZeroView(SeededDataset(train_set, seed))
        was_training = self.training
        scores = self.rank_training_set(dataset, data_cfg, device)
        self.train(was_training)
        mask = select_fraction(scores, cfg.fraction, cfg.half)
        self.selected = mask.to(device)
        chosen = scores[mask]
        record = {
            "split": cfg.split, "half": cfg.half, "fraction": cfg.fraction, "rank_view": cfg.rank_view,
            "rank_temperature": cfg.rank_temperature, "num_samples": int(scores.numel()),
            "num_selected": int(mask.sum()),
            "selected_conf_min": float(chosen.min()) if chosen.numel() else None,
            "selected_conf_max": float(chosen.max()) if chosen.numel() else None,
            "selected_conf_mean": float(chosen.mean()) if chosen.numel() else None,
            "other_conf_mean": float(scores[~mask].mean()) if (~mask).any() else None,
        }
        log.info("dkd_split: NCKD on the %s %d of %d training samples (teacher p_t %.3f..%.3f)",
                 cfg.half, record["num_selected"], record["num_samples"],
                 record["selected_conf_min"] or 0.0, record["selected_conf_max"] or 0.0)
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / SPLIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            np.save(Path(run_dir) / SPLIT_INDICES, mask.nonzero().squeeze(1).numpy().astype("<i8"))

    # ------------------------------------------------------------------ training step
    def selection(self, t_logits: Tensor, targets: Tensor, indices: Tensor | None) -> Tensor:
        """Bool mask of this batch's samples that get NCKD."""
        cfg: DKDSplitConfig = self.cfg  # type: ignore[assignment]
        if cfg.split == "batch":
            return select_fraction(target_confidence(t_logits, targets, cfg.rank_temperature), cfg.fraction, cfg.half)
        if indices is None:
            raise TrainingError(
                "method dkd_split with method.split=global needs each batch's sample indices "
                "(Batch.indices), and this training loop does not pass them; use method.split=batch"
            )
        if self.selected.numel() == 0:
            raise TrainingError("method dkd_split with method.split=global: the training set was not "
                                "ranked (setup() was not called); use method.split=batch")
        return self.selected[indices.to(self.selected.device).long()]

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: DKDSplitConfig = self.cfg  # type: ignore[assignment]
        images, targets, indices = batch.images, batch.targets, batch.indices
        t_logits = self.teacher_logits(batch)
        logits = self.student(images)
        parts = dkd_terms(logits, t_logits, targets, cfg.temperature)
        mask = self.selection(t_logits, targets, indices).to(logits.device)
        warm = warmup_factor(epoch, cfg.warmup_epochs)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, targets),
            "nckd": warm * cfg.beta * masked_mean(parts.nckd, mask, cfg.normalize),
        }
        if cfg.tckd == "all":
            losses["tckd"] = warm * cfg.alpha * parts.tckd.mean()
        elif cfg.tckd == "selected":
            losses["tckd"] = warm * cfg.alpha * masked_mean(parts.tckd, mask, cfg.normalize)
        conf = target_confidence(t_logits, targets)
        sel = mask.float()
        stats = {
            "teacher_conf": teacher_target_confidence(t_logits, targets),
            "nckd_share": sel.mean(),
            # Mean teacher p_t of the samples that got NCKD (0 when none did).
            "selected_conf": (conf * sel).sum() / sel.sum().clamp_min(1.0),
        }
        return StepOutput(logits, losses, stats)


__all__ = ["DKDSplit", "DKDSplitConfig", "masked_mean", "select_fraction", "target_confidence"]
