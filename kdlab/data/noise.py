"""Synthetic label noise for robustness experiments."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def symmetric_label_noise(
    targets: Sequence[int], num_classes: int, ratio: float, seed: int
) -> tuple[list[int], list[bool]]:
    """Symmetric label noise: each label is, with probability `ratio`, replaced by a class
    drawn uniformly among the `num_classes - 1` *other* classes.

    Returns ``(new_targets, flipped_mask)``; ``flipped_mask[i]`` is True exactly where
    ``new_targets[i] != targets[i]``. The result depends only on the arguments (numpy
    ``default_rng(seed)``), so the same seed gives the same noisy labels on every machine.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"label noise ratio must be in [0, 1], got {ratio}")
    y = np.asarray(list(targets), dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if ratio > 0 and num_classes < 2:
        raise ValueError("symmetric label noise needs at least 2 classes")
    rng = np.random.default_rng(seed)
    flip = rng.random(y.size) < ratio
    if num_classes >= 2:
        # t + U{1..K-1} (mod K) is uniform over the K-1 classes other than t.
        offset = rng.integers(1, num_classes, size=y.size)
        noisy = np.where(flip, (y + offset) % num_classes, y)
    else:
        noisy = y
    return [int(v) for v in noisy], [bool(f) for f in flip]
