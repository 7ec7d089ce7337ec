"""Aspect-ratio grouped batches that resume exactly: the detection training order.

Detectron2 batches landscape images with landscape ones and portrait with portrait
(`ASPECT_RATIO_GROUPING`), so that padding a batch to its largest image wastes little.
`GroupedBatchSampler` does the same over one epoch of `EpochSampler`'s order (shuffled by
seed and epoch, sharded across DDP ranks): it walks that order, puts each index into its
orientation's bucket and emits a bucket when it holds `batch_size` indices.

What is left at the end of the epoch (fewer than `batch_size` in each bucket) becomes one
mixed batch when it fits in one, else one batch per bucket, so every rank has exactly
ceil(samples per rank / batch_size) batches per epoch and DDP ranks never wait for each
other. The batches of an epoch are a function of (seed, epoch, rank) only, and
`set_epoch(epoch, start)` skips the first `start // batch_size` of them: an interrupted run
resumes at the very batch it stopped at. Items are `(epoch, index)` pairs, the keys
`SeededDataset` seeds each sample's augmentation with.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

from kdlab.data.sampling import EpochSampler


class GroupedBatchSampler:
    """Batches of `(epoch, index)` keys of images of one orientation (see the module docstring).

    aspect_ratios: width / height of every image of the dataset; `group=False` batches in
    plain shuffled order.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, *, seed: int, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True, group: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.landscape = [r >= 1.0 for r in aspect_ratios]
        self.batch_size = batch_size
        self.group = group
        self.sampler = EpochSampler(range(len(aspect_ratios)), seed=seed, shuffle=shuffle,  # type: ignore[arg-type]
                                    num_replicas=num_replicas, rank=rank)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Fix the epoch's order; `start` is the number of this rank's samples already
        trained on in this epoch (a whole number of batches)."""
        self.epoch = epoch
        self.start = start

    def batches(self) -> list[list[tuple[int, int]]]:
        """Every batch of the current epoch, in order."""
        self.sampler.set_epoch(self.epoch, 0)
        buckets: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
        out: list[list[tuple[int, int]]] = []
        for key in self.sampler:
            bucket = buckets[self.landscape[key[1]] if self.group else True]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                out.append(list(bucket))
                bucket.clear()
        rest = [b for b in (buckets[True], buckets[False]) if b]
        if sum(len(b) for b in rest) <= self.batch_size:
            if rest:
                out.append([k for b in rest for k in b])
        else:
            out.extend(rest)
        return out

    def _total(self) -> int:
        return math.ceil(self.sampler.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches()[self.start // self.batch_size:]

    def __len__(self) -> int:
        return self._total() - self.start // self.batch_size


__all__ = ["GroupedBatchSampler"]
