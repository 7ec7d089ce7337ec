"""CRD: ce_weight * CE + weight * (NCE(student anchors, teacher bank) + NCE(teacher anchors,
student bank)) (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020).

Each network's pooled feature goes through its own embedding head (linear to `feat_dim`, then
L2 normalisation); both heads are trained, the teacher itself is not. A memory bank holds an
embedding of every training sample for each network, keyed by `Batch.indices`. For every
sample, its own row in the other network's bank is the positive and `num_negatives` rows of
other samples are the negatives; the NCE loss (`kdlab.losses.crd`) pulls the positive pair
together. After the step the batch's rows move towards the new embeddings with `momentum`.

Settings (PAPERS.md section 5, the authors' RepDistiller and mdistiller): feat_dim 128,
16384 negatives, temperature 0.07, momentum 0.5, CE weight 1, CRD weight 0.8. Negatives come
from the samples of the other classes, as RepDistiller's CIFAR-100 sampler (`mode exact`)
draws them (`negatives: all` draws from every other sample), without replacement unless a
pool is smaller than `num_negatives`.

State and the engine:
- the banks and the normalisation constants are buffers of `self.memory`, created by
  `setup(context)` with `context.num_train_samples` rows (so they are in `extra_state_dict()`
  and a resumed checkpoint restores them: setup runs before the resume loads extra state);
- negatives are drawn with a generator reseeded every step from (train.seed, rank, number of
  batches drawn so far); that count is checkpointed with the banks, so a run and its resumed
  copy (mid-epoch too) draw the same negatives whatever else consumes the global RNGs, and
  ranks draw independently;
- under DDP (`context.world_size > 1`) the embeddings and indices of every rank are
  all-gathered before the bank update and the normalisation constants come from the gathered
  scores, so every rank's bank stays identical; DDP is told to leave the banks alone (no
  per-step broadcast of 2 x N x feat_dim floats). Every rank must see batches of the same size
  (the engine's distributed sampler pads each rank to the same count).
"""
from __future__ import annotations

import logging
from typing import Any, Literal, Sized

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig, Temperature
from kdlab.errors import CheckpointError, ConfigError, TrainingError
from kdlab.losses import (
    contrast_indices,
    contrast_logits,
    crd_nce_loss,
    cross_entropy,
    init_memory,
    momentum_update,
    nce_log_normalizer,
    negative_pool,
)
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, SetupContext, StepOutput
from kdlab.losses.kd import teacher_target_confidence
from kdlab.models import feature_info

log = logging.getLogger(__name__)


class CRDConfig(MethodConfig):
    # Defaults: PAPERS.md section 5 (RepDistiller --distill crd -r 1 -a 0 -b 0.8, --feat_dim 128,
    # --nce_k 16384, --nce_t 0.07, --nce_m 0.5, --mode exact; mdistiller CRD the same).
    name: Literal["crd"] = "crd"
    ce_weight: NonNegativeFloat = 1.0
    weight: NonNegativeFloat = 0.8  # of the summed student- and teacher-anchored NCE losses
    feat_dim: PositiveInt = 128
    num_negatives: PositiveInt = 16384
    temperature: Temperature = 0.07
    momentum: float = Field(default=0.5, ge=0.0, le=1.0)
    negatives: Literal["other_classes", "all"] = "other_classes"


class Embed(nn.Module):
    """CRD's embedding head: linear to `dim_out`, then L2 normalisation (in float32)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


class ContrastMemory(nn.Module):
    """The two banks (N, D) and log Z for the student and the teacher anchors (NaN: not yet
    set). Empty until `reset`; a state dict with banks loads into an empty memory (adopting
    its size) or into one of the same size, and names the mismatch otherwise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("student", torch.zeros(0, dim))
        self.register_buffer("teacher", torch.zeros(0, dim))
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self.log_z_known: bool | None = None  # None: read log_z once (after a reset or a load)
        self.draws = 0  # batches that drew negatives so far: seeds the next draw; checkpointed

    # The draw count travels in the state dict as `memory._extra_state` (a host-side int, so
    # seeding a step needs no device synchronisation).
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.draws, dtype=torch.long)

    def set_extra_state(self, state: Tensor) -> None:
        self.draws = int(state)

    @property
    def size(self) -> int:
        return int(self.student.shape[0])

    def reset(self, num_data: int, generator: torch.Generator, device: torch.device) -> None:
        self.student = init_memory(num_data, self.dim, generator).to(device)
        self.teacher = init_memory(num_data, self.dim, generator).to(device)
        self.log_z = torch.full((2,), float("nan"), device=device)
        self.log_z_known = False
        self.draws = 0

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "student")
        if saved is not None and saved.shape[0] != self.size:
            if self.size:
                raise CheckpointError(
                    f"the checkpoint's CRD memory bank holds {saved.shape[0]} training samples, but this "
                    f"run's training set has {self.size}; resume with the same data settings "
                    "(data.name, data.train_subset) the checkpoint was trained with"
                )
            for name in ("student", "teacher"):  # not set up yet: take the checkpoint's size
                setattr(self, name, torch.zeros_like(state_dict[prefix + name], device=self.log_z.device))
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.log_z_known = None


def training_labels(train_set: Sized) -> Tensor:
    """Every training sample's label, from the dataset's `.targets` (kdlab's and torchvision's
    datasets have it) or else by reading each item `(image, target)` once."""
    targets = getattr(train_set, "targets", None)
    if targets is None:
        log.info("CRD: reading the labels of %d training samples one by one (the dataset has no .targets)",
                 len(train_set))
        targets = [int(train_set[i][1]) for i in range(len(train_set))]  # type: ignore[index]
    return torch.as_tensor([int(t) for t in targets], dtype=torch.long)


#: Buffers DDP must neither broadcast every step nor sync when it wraps the distiller: every
#: rank keeps them identical itself (same seed at setup, all-gathered updates).
DDP_LOCAL_BUFFERS = ("memory.student", "memory.teacher", "memory.log_z")


def draw_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for the negatives of `step` on `rank` (a simple mix of the three; distinct
    in practice for every triple)."""
    x = (seed * 0x9E3779B97F4A7C15 + (rank + 1) * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & (2**63 - 1)
    return x ^ (x >> 31)


def first_occurrences(indices: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of `indices`. A distributed
    sampler pads the last ranks with repeated samples: each bank row is then updated once,
    from the first copy in rank order, identically on every rank."""
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


@register_method("crd")
class CRD(Distiller):
    """Contrastive representation distillation with a memory bank of every training sample."""

    Config = CRDConfig
    needs_teacher_features = True  # the teacher's pooled feature, not its logits
    needs_sample_indices = True
    ddp_local_buffers = DDP_LOCAL_BUFFERS

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: CRDConfig = cfg  # type: ignore[assignment]
        self.embed_student = Embed(feature_info(student, self.input_size).pooled_dim, c.feat_dim)
        self.embed_teacher = Embed(feature_info(teacher, self.input_size).pooled_dim, c.feat_dim)
        self.memory = ContrastMemory(c.feat_dim)
        self.world_size, self.rank, self.seed = 1, 0, 0
        self.labels: Tensor | None = None  # (N,) with negatives=other_classes
        self.replacement = False
        self.generator: torch.Generator | None = None

    # -- the engine's hook ---------------------------------------------------------------
    def setup(self, context: SetupContext) -> None:
        cfg: CRDConfig = self.cfg  # type: ignore[assignment]
        n = int(context.num_train_samples)
        self.world_size, self.rank, self.seed = int(context.world_size), int(context.rank), int(context.seed)
        if cfg.negatives == "other_classes":
            labels = (torch.as_tensor(list(context.train_targets), dtype=torch.long)
                      if context.train_targets is not None else training_labels(context.train_set))
            if labels.numel() != n:
                raise ConfigError(
                    f"CRD: the training set reports {n} samples but {labels.numel()} labels; "
                    "use method.negatives=all"
                )
            smallest_pool = n - int(torch.bincount(labels).max()) if n else 0
            self.labels = labels.to(context.device)
        else:
            smallest_pool, self.labels = n - 1, None
        if smallest_pool < 1:
            raise ConfigError(
                f"CRD needs at least one negative for every sample, but the training set ({n} samples) "
                + ("has a single class; use method.negatives=all" if cfg.negatives == "other_classes"
                   else "has fewer than 2 samples")
            )
        # RepDistiller draws without replacement unless the pool is too small (replace = K > pool).
        self.replacement = cfg.num_negatives > smallest_pool
        if self.replacement:
            log.warning("CRD: %d negatives per sample but only %d candidates for some samples: drawing "
                        "with replacement", cfg.num_negatives, smallest_pool)
        self.generator = torch.Generator(device=context.device)
        # Seeded, not from the global RNG: every rank builds the same initial banks.
        self.memory.reset(n, torch.Generator().manual_seed(context.seed), context.device)

    # -- the step ------------------------------------------------------------------------
    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        cfg: CRDConfig = self.cfg  # type: ignore[assignment]
        if batch.indices is None:
            raise TrainingError("CRD needs each sample's training-set index (Batch.indices), and this "
                                "batch has none")
        if self.memory.size == 0 or self.generator is None:
            raise TrainingError("CRD's memory bank is empty: call setup(context) before training")
        t_logits, t_feats = self.teacher_forward(batch.images, features=True)
        logits, s_feats = self.student(batch.images, features=True)
        v_s = self.embed_student(s_feats.pooled)
        v_t = self.embed_teacher(t_feats.pooled)
        indices = batch.indices.long()
        sample = self.draw(indices)
        s_scores = contrast_logits(v_s, self.memory.teacher, sample, cfg.temperature)
        t_scores = contrast_logits(v_t, self.memory.student, sample, cfg.temperature)
        log_z = self.normalizers(s_scores, t_scores)
        n = self.memory.size
        s_loss = crd_nce_loss(s_scores, log_z[0], n)
        t_loss = crd_nce_loss(t_scores, log_z[1], n)
        self.update_memory(indices, v_s, v_t)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, batch.targets),
            "crd": cfg.weight * (s_loss + t_loss),
        }
        stats = {
            "crd_student": s_loss.detach(),  # unweighted NCE of the student anchors
            "crd_teacher": t_loss.detach(),
            "teacher_conf": teacher_target_confidence(t_logits, batch.targets),
        }
        return StepOutput(logits, losses, stats)

    # -- pieces of the step --------------------------------------------------------------
    def draw(self, indices: Tensor) -> Tensor:
        """(B, K + 1): each sample's own row, then its negatives, from a generator reseeded
        from (seed, rank, batches drawn so far): reproducible, resumable with the checkpointed
        count, independent across ranks, and untouched by other users of the global RNGs."""
        cfg: CRDConfig = self.cfg  # type: ignore[assignment]
        assert self.generator is not None
        self.generator.manual_seed(draw_seed(self.seed, self.rank, self.memory.draws))
        self.memory.draws += 1
        pool = negative_pool(indices, self.memory.size, self.labels)
        return contrast_indices(indices, pool, cfg.num_negatives, self.replacement, self.generator)

    def normalizers(self, s_scores: Tensor, t_scores: Tensor) -> Tensor:
        """[log Z_student, log Z_teacher], set from the first batch (all ranks' scores) and kept."""
        memory = self.memory
        if memory.log_z_known is None:  # one host read after setup or a checkpoint load
            memory.log_z_known = bool(torch.isfinite(memory.log_z).all())
        if not memory.log_z_known:
            n = memory.size
            s_all, t_all = self.gather(s_scores.detach()), self.gather(t_scores.detach())
            memory.log_z.copy_(torch.stack([nce_log_normalizer(s_all, n), nce_log_normalizer(t_all, n)]))
            memory.log_z_known = True
            log.info("CRD normalisation constants: log Z = %.4f (student anchors), %.4f (teacher anchors)",
                     *memory.log_z.tolist())
        return memory.log_z

    @torch.no_grad()
    def update_memory(self, indices: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Move the batch's rows (every rank's batch under DDP) towards the new embeddings.
        A row whose update is not finite keeps its old value: one bad step must not poison
        the bank for the rest of training (the engine skips that step's optimizer update)."""
        momentum = self.cfg.momentum  # type: ignore[attr-defined]
        indices, v_s, v_t = self.gather(indices), self.gather(v_s.detach()), self.gather(v_t.detach())
        keep = first_occurrences(indices)
        indices, v_s, v_t = indices[keep], v_s[keep], v_t[keep]
        for bank, v in ((self.memory.student, v_s), (self.memory.teacher, v_t)):
            old = bank[indices]
            new = momentum_update(old, v, momentum)
            bank.index_copy_(0, indices, torch.where(torch.isfinite(new).all(1, keepdim=True), new, old))

    def gather(self, x: Tensor) -> Tensor:
        """`x` of every rank, concatenated in rank order along dim 0 (itself when not distributed)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


__all__ = ["CRD", "CRDConfig", "ContrastMemory", "Embed", "draw_seed", "first_occurrences", "training_labels"]
