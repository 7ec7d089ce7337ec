"""`digits`: scikit-learn's bundled handwritten digits, the dataset that needs no download.

1797 grayscale 8x8 images of the digits 0-9 (`sklearn.datasets.load_digits`, shipped inside
scikit-learn). The split is stratified and fixed: in each class, a permutation drawn with
numpy ``default_rng(DIGITS_SPLIT_SEED)`` puts ``round(0.2 * n_class)`` images in val and
the rest in train (1438 train / 359 val), whatever the experiment seed.

Images are scaled to [0, 1] (pixel / 16), upsampled bilinearly to `size` x `size`
(16 by default; ``data.transform: cifar`` gives 32x32, ``data.image_size`` any side), repeated to 3 channels so the
CIFAR zoo's conv nets accept them, and normalised with the train split's mean/std. Each
split is one tensor in memory; `augment: standard` is a random crop with padding size/8
(2 at 16x16, 4 at 32x32) done on the tensor, no flips (digits are not flip-invariant).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kdlab.schema.experiment import DataConfig
from kdlab.data.datasets import DataBundle, register_dataset
from kdlab.data.transforms import (
    Transform,
    check_augment,
    check_preset,
    eval_transform,
    train_transform,
)

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2
#: data.transform presets for digits -> square image side.
DIGITS_SIZES = {"digits": 16, "cifar": 32}


class DigitsDataset(Dataset):
    """An in-memory tensor dataset: `images` (N, C, H, W) float, `targets` list of ints."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform: Transform | None = None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, val_idx): per class, `round(val_fraction * n)` go to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_val = int(round(val_fraction * idx.size))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@functools.lru_cache(maxsize=4)
def _load(size: int) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int], float, float]:
    # lazy: scikit-learn (and the scipy it loads) is needed only by this dataset, not by every
    # `import kdlab.data` (config loading, CIFAR and ImageNet runs)
    from sklearn.datasets import load_digits

    raw = load_digits()
    labels = np.asarray(raw.target, dtype=np.int64)
    images = torch.from_numpy(np.asarray(raw.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, val_idx = stratified_split(labels, DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    train, val = images[torch.from_numpy(train_idx)], images[torch.from_numpy(val_idx)]
    mean, std = float(train.mean()), float(train.std())
    train = ((train - mean) / std).expand(-1, 3, -1, -1).contiguous()
    val = ((val - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return train, labels[train_idx].tolist(), val, labels[val_idx].tolist(), mean, std


@register_dataset("digits")
def build_digits(cfg: DataConfig) -> DataBundle:
    preset = check_preset(cfg.transform or "digits", list(DIGITS_SIZES), "digits")
    size = cfg.image_size or DIGITS_SIZES[preset]
    check_augment(cfg.augment)  # fail on a bad value before loading anything
    train_x, train_y, val_x, val_y, m, s = _load(size)
    mean, std = (m, m, m), (s, s, s)
    # The tensors are shared with the cache: the datasets never write to them.
    train_tf = train_transform("digits", cfg.augment, mean, std, size)
    train = DigitsDataset(train_x, train_y, train_tf)
    val = DigitsDataset(val_x, val_y, eval_transform("digits", mean, std, size))
    return DataBundle(
        train=train,
        val=val,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        input_size=(3, size, size),
        mean=mean,
        std=std,
        train_targets=list(train.targets),
    )
