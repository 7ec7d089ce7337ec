"""Deterministic, resumable data order and augmentation.

`EpochSampler` is a `DistributedSampler` (one replica when not distributed) that tags each
index with its epoch and can start mid-epoch. `SeededDataset` seeds the torch RNG per
sample from (seed, epoch, index) before applying the dataset's random transforms, so a
sample's augmentation does not depend on the number of workers, on the process that loads
it, or on where a resumed run restarted. That is what makes an interrupted and resumed
run bit-identical to an uninterrupted one, and lets the teacher-output cache know which
view a sample got.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # A simple 64-bit mix; distinct for every (seed, epoch, index) in practice.
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**63 - 1)
    x ^= x >> 31
    return x


class SeededDataset(Dataset):
    """Wrap a dataset so item `(epoch, i)` is transformed under a seed fixed by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        state = torch.get_rng_state()
        # Only the CPU generator (the one transforms draw from, and the one get/set_rng_state
        # save): torch.manual_seed would also queue CUDA/XPU/MTIA seeding with a formatted
        # stack trace, ~0.1-0.2 ms per sample, more than the crop and flip themselves.
        torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            image, target = self.dataset[index]
        finally:
            torch.set_rng_state(state)
        return image, target, index

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochSampler(DistributedSampler):
    """Yields `(epoch, index)`; shuffles with seed + epoch; can skip already-seen samples."""

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        for i in indices[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return super().__len__() - self.start
