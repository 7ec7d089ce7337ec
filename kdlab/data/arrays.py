"""The raw uint8 pixels of a training set, for pipelines that skip per-item transforms.

The GPU pipeline and the teacher-output cache need every training image as uint8
(H, W, 3), exactly the pixels the standard pipeline hands to its first transform:

- `CIFARArrays` (cifar10, cifar100) already holds them in `.data`;
- an ImageFolder is decoded once with its own loader (PIL, converted to RGB), as its
  `__getitem__` does;
- `RelabeledSubset` (train_subset, label noise) maps its indices onto the base dataset.

`base_of(dataset)` returns the base dataset and, for a subset, the base index of each
sample: the cache is keyed by base index, so one cache serves every subset and seed.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdlab.data.datasets import RelabeledSubset
from kdlab.errors import DataError


def base_of(dataset: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """(base dataset, base index of each sample or None when it is the base itself)."""
    index: np.ndarray | None = None
    while isinstance(dataset, RelabeledSubset):
        own = np.asarray(dataset.indices, dtype=np.int64)
        index = own if index is None else own[index]
        dataset = dataset.dataset
    return dataset, index


def uint8_images(base: Dataset, what: str, indices: np.ndarray | None = None) -> np.ndarray:
    """Images of a base dataset (all, or those at `indices`) as one (N, H, W, 3) uint8 array.

    `what` names the feature that needs them, for the error message.
    """
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3:
        return data if indices is None else data[indices]
    samples, loader = getattr(base, "samples", None), getattr(base, "loader", None)
    if samples is not None and loader is not None:
        paths = [p for p, _ in samples] if indices is None else [samples[int(i)][0] for i in indices]
        return _decode_all(paths, loader, what)
    raise DataError(
        f"{what} needs a dataset of uint8 RGB images (cifar10, cifar100, or imagefolder with "
        f"data.transform=cifar), not {type(base).__name__}; use data.pipeline=standard and no "
        "teacher.cache for this dataset"
    )


def uint8_image(base: Dataset, i: int, what: str) -> np.ndarray:
    """Image `i` of a base dataset as (H, W, 3) uint8, without decoding the others."""
    return uint8_images(base, what, np.array([i]))[0]


def _decode_all(paths: list[str], loader: Any, what: str) -> np.ndarray:
    """Decode image files with the dataset's loader, in threads (PIL decodes without the GIL)."""
    first = np.asarray(loader(paths[0])) if paths else np.zeros((0, 0, 3), np.uint8)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)

    def decode(i: int) -> None:
        pixels = np.asarray(loader(paths[i]))
        if pixels.shape != first.shape:
            raise DataError(
                f"{what} needs images of one size, but {paths[i]!r} is {pixels.shape[1]}x{pixels.shape[0]} "
                f"and {paths[0]!r} is {first.shape[1]}x{first.shape[0]}; resize the images to "
                "one size or use data.pipeline=standard and no teacher.cache"
            )
        out[i] = pixels

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(paths)), chunksize=256))
    return out


__all__ = ["base_of", "uint8_image", "uint8_images"]
