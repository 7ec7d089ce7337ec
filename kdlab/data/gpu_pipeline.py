"""`data.pipeline: gpu`: the whole uint8 training set on the training device.

For CIFAR-size data the standard pipeline (a DataLoader whose workers decode, pad, crop,
flip and normalise one PIL image at a time) costs more CPU than a small student's GPU
step. Here the training and validation images live on the device as uint8 (CIFAR-100's
training set is 150 MB), and each batch is one gather (`kdlab.data.views.crop_flip`) plus
the normalisation, on whole batches, with no workers and no host-to-device copies.

Semantics are those of the standard pipeline:

- batch order: the same `EpochSampler` permutation (seed + epoch), so the same samples
  form each batch, and mid-epoch resume works unchanged (`loader.sampler.set_epoch`);
- augmentation: the same distribution (uniform crop offsets in the zero-padded image,
  flip with p = 0.5), drawn once per epoch per sample index by `epoch_views` from
  (seed, epoch); only the random stream differs from torchvision's per-sample draws;
- pixels: bit-identical to torchvision's for the same view (`kdlab.data.views`).

Batches are `(images, targets, indices, views)`; the views let the teacher-output cache
look up the teacher's logits for exactly the drawn view. Works on CPU too (that is how
the tests check it). Only the finite crop/flip augmentation is supported; anything else
(AutoAugment, RandomResizedCrop, pre-normalised digits tensors) is a `DataError`.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from kdlab.data.arrays import base_of, uint8_images
from kdlab.data.datasets import DataBundle
from kdlab.data.sampling import EpochSampler
from kdlab.data.views import UnsupportedAugmentation, ViewSpec, describe_transform, epoch_views, normalize, crop_flip
from kdlab.errors import DataError

WHAT = "data.pipeline=gpu"


def dataset_spec(dataset, image_size: int, what: str, fix: str) -> ViewSpec:
    """The `ViewSpec` of a dataset's transform, or a `DataError` naming it and the fix."""
    base, _ = base_of(dataset)
    try:
        return describe_transform(getattr(base, "transform", None), image_size)
    except UnsupportedAugmentation as exc:
        raise DataError(f"{what} needs a crop/flip augmentation with a finite set of views, but the "
                        f"training transform is {exc}; {fix}") from None


def check_image_size(shape: tuple[int, ...], spec: ViewSpec, what: str, fix: str) -> None:
    """Views are crops of images of the crop's own size; anything else has other offsets."""
    if tuple(shape[:2]) != (spec.size, spec.size):
        raise DataError(f"{what} needs {spec.size}x{spec.size} images (the crop size), but they are "
                        f"{shape[1]}x{shape[0]}; {fix}")


def device_images(dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """(uint8 (N, H, W, 3), int64 targets (N,)) of a dataset on `device`, in its own index order."""
    base, index = base_of(dataset)
    pixels = uint8_images(base, WHAT, index)  # only the subset's images
    targets = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device), targets.to(device)


class GpuTrainLoader:
    """Yields `(images, targets, indices, views)` batches from a device-resident uint8 set."""

    def __init__(self, images: Tensor, targets: Tensor, spec: ViewSpec, batch_size: int, seed: int, *,
                 channels_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        self.images, self.targets, self.spec = images, targets, spec
        self.batch_size, self.seed, self.channels_last = batch_size, seed, channels_last
        self.device = images.device
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        # The standard pipeline's sampler: same permutation, sharding and resume position.
        self.sampler = EpochSampler(range(len(targets)), seed=seed, shuffle=True,
                                    num_replicas=num_replicas, rank=rank)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        epoch = self.sampler.epoch
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long).to(self.device)
        views = epoch_views(self.spec, self.seed, epoch, len(self.targets)).to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            v = views[idx]
            x = normalize(crop_flip(self.images[idx], v, self.spec), self.mean, self.std, self.channels_last)
            yield x, self.targets[idx], idx, v


class GpuEvalLoader:
    """Yields `(images, targets)` of a device-resident validation set, in order, no augmentation."""

    def __init__(self, images: Tensor, targets: Tensor, spec: ViewSpec, batch_size: int, *,
                 channels_last: bool = False) -> None:
        self.images, self.targets, self.batch_size, self.channels_last = images, targets, batch_size, channels_last
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=images.device)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            x = self.images[start:start + self.batch_size]
            yield normalize(x, self.mean, self.std, self.channels_last), self.targets[start:start + self.batch_size]


def gpu_loaders(data: DataBundle, cfg, seed: int, device: torch.device, *, channels_last: bool = False,
                num_replicas: int = 1, rank: int = 0) -> tuple[GpuTrainLoader, GpuEvalLoader]:
    """The train and val loaders of `data.pipeline: gpu` (`cfg` is the `DataConfig`)."""
    size = int(data.input_size[-1])
    fix = "set data.pipeline=standard (or data.augment=standard)"
    spec = dataset_spec(data.train, size, WHAT, fix)
    val_spec = dataset_spec(data.val, size, WHAT + " (validation set)", fix)
    if val_spec.padding or val_spec.flip or (val_spec.mean, val_spec.std) != (spec.mean, spec.std):
        raise DataError(f"{WHAT}: the validation transform is not the training one without augmentation; {fix}")
    x, y = device_images(data.train, device)
    check_image_size(tuple(x.shape[1:]), spec, WHAT, fix)
    train = GpuTrainLoader(x, y, spec, cfg.batch_size, seed, channels_last=channels_last,
                           num_replicas=num_replicas, rank=rank)
    vx, vy = device_images(data.val, device)
    # Under DDP each rank evaluates its shard rank, rank + world, ... (as ShardSampler does).
    vx, vy = vx[rank::num_replicas].contiguous(), vy[rank::num_replicas].contiguous()
    val = GpuEvalLoader(vx, vy, val_spec, cfg.eval_batch_size or max(cfg.batch_size, 128),
                        channels_last=channels_last)
    return train, val


__all__ = ["GpuEvalLoader", "GpuTrainLoader", "check_image_size", "dataset_spec", "device_images", "gpu_loaders"]
