"""Finite augmentation views: CIFAR's pad-and-crop offsets times horizontal flips.

CIFAR's standard training augmentation, ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()``, has a finite set of outcomes: the crop's top-left corner
(dy, dx) in the 40x40 zero-padded image, dy, dx in 0..8, times flip in {0, 1}, which is
162 *views* per image. A view is one integer

    view = (dy * n_offsets + dx) * n_flips + flip

(`ViewSpec.encode` / `decode`). Two things build on this:

- the GPU pipeline (`kdlab.data.gpu_pipeline`) draws view ids on the device and applies
  them to whole uint8 batches with one gather (`crop_flip`);
- the teacher-output cache (`kdlab.engine.teacher_cache`) stores the teacher's logits for
  every view of every image and looks up the one a sample drew.

Exactness. torchvision pads the *uint8* image with 0 and normalises after the crop, so a
padded pixel becomes ``(0 - mean) / std``. `crop_flip` pads uint8 with 0 and `normalize`
repeats ToTensor's and Normalize's float32 operations in the same order (divide by 255,
subtract the mean, divide by the std), so an image here equals torchvision's bit for bit.

Which view did the standard pipeline draw? `SeededDataset` seeds the torch RNG with
``sample_seed(seed, epoch, index)`` before the transform; `view_of` replays that
transform's draws (RandomCrop: ``randint`` for the top, then for the left, only when the
padded image is larger than the crop; RandomHorizontalFlip: ``rand(1) < p``) on a private
generator. `check_view_replay` verifies this against the real transform at start-up, so a
torchvision release that changed its draws would be caught instead of silently caching
the wrong views.

Only exactly this family is supported (`describe_transform`): optional zero-padded
RandomCrop to the image's own size, optional RandomHorizontalFlip(0.5), ToTensor,
Normalize. Continuous augmentations (RandomResizedCrop, AutoAugment, colour jitter, ...)
have no finite view set; they raise `UnsupportedAugmentation`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import transforms as T

from kdlab.data.sampling import sample_seed

FLIP_P = 0.5


class UnsupportedAugmentation(ValueError):
    """The training transform is not a finite crop/flip family; the message says what it is."""


@dataclass(frozen=True)
class ViewSpec:
    """A finite crop/flip augmentation of `size` x `size` images and its normalisation."""

    size: int
    padding: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def n_offsets(self) -> int:
        return 2 * self.padding + 1

    @property
    def n_flips(self) -> int:
        return 2 if self.flip else 1

    @property
    def num_views(self) -> int:
        return self.n_offsets**2 * self.n_flips

    def encode(self, dy: Tensor | int, dx: Tensor | int, flip: Tensor | int) -> Tensor | int:
        return (dy * self.n_offsets + dx) * self.n_flips + flip

    def decode(self, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dy, dx, flip) of each view id."""
        flip = views % self.n_flips
        offset = views // self.n_flips
        return offset // self.n_offsets, offset % self.n_offsets, flip

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return {"kind": "crop_flip", "fill": 0, **d}

    def describe(self) -> str:
        parts = [f"RandomCrop({self.size}, padding={self.padding})"] if self.padding else []
        parts += ["RandomHorizontalFlip()"] if self.flip else []
        return " + ".join(parts or ["no augmentation"]) + f" ({self.num_views} views)"


# ----------------------------------------------------------------------------- recognising


def describe_transform(transform: Any, image_size: int) -> ViewSpec:
    """The `ViewSpec` of a training transform, or `UnsupportedAugmentation` saying why not.

    Accepted: ``Compose([RandomCrop(s, padding=p)?, RandomHorizontalFlip(0.5)?, ToTensor(),
    Normalize(mean, std)])`` with zero constant padding and s equal to the image size.
    """
    steps = list(getattr(transform, "transforms", [transform]))
    names = " + ".join(type(t).__name__ for t in steps)
    padding, flip = 0, False
    if steps and isinstance(steps[0], T.RandomCrop):
        crop = steps.pop(0)
        pad = crop.padding
        if isinstance(pad, Sequence) and len(pad) == 1:
            pad = pad[0]
        if not isinstance(pad, int) and pad is not None:
            raise UnsupportedAugmentation(f"RandomCrop with uneven padding {crop.padding!r}")
        if crop.fill != 0 or crop.padding_mode != "constant" or crop.pad_if_needed:
            raise UnsupportedAugmentation(
                f"RandomCrop with fill={crop.fill!r}, padding_mode={crop.padding_mode!r}, "
                f"pad_if_needed={crop.pad_if_needed} (only zero constant padding has the views cached here)"
            )
        if tuple(crop.size) != (image_size, image_size):
            raise UnsupportedAugmentation(
                f"RandomCrop to {tuple(crop.size)} from {image_size}x{image_size} images"
            )
        padding = int(pad or 0)
    if steps and isinstance(steps[0], T.RandomHorizontalFlip):
        if steps[0].p != FLIP_P:
            raise UnsupportedAugmentation(f"RandomHorizontalFlip(p={steps[0].p})")
        steps.pop(0)
        flip = True
    if len(steps) != 2 or not isinstance(steps[0], T.ToTensor) or not isinstance(steps[1], T.Normalize):
        raise UnsupportedAugmentation(
            f"{names}: not a finite set of crop/flip views (continuous augmentations such as "
            "RandomResizedCrop or AutoAugment, and pre-normalised tensor datasets, are not)"
        )
    norm = steps[1]
    return ViewSpec(int(image_size), padding, flip, tuple(map(float, norm.mean)), tuple(map(float, norm.std)))


# ----------------------------------------------------------------------------- applying


def crop_flip(images: Tensor, views: Tensor, spec: ViewSpec) -> Tensor:
    """Apply each image's view to a uint8 batch (B, H, W, C) -> (B, size, size, C).

    Zero-pads by `spec.padding`, then gathers the crop (flipped where asked) with one
    advanced-indexing op, so it runs as a handful of kernels on any device.
    """
    p, s = spec.padding, spec.size
    dy, dx, flip = spec.decode(views.to(images.device))
    padded = F.pad(images, (0, 0, p, p, p, p)) if p else images
    ar = torch.arange(s, device=images.device)
    rows = dy[:, None] + ar  # (B, s)
    cols = dx[:, None] + torch.where(flip[:, None].bool(), s - 1 - ar, ar)  # flip: read right to left
    b = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return padded[b, rows[:, :, None], cols[:, None, :]]


def normalize(images: Tensor, mean: Tensor, std: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) normalised, with torchvision's exact ops.

    `mean`, `std`: float32 (C,) on the images' device. The permute makes a channels-last
    view for free; `channels_last=False` makes it contiguous NCHW.
    """
    x = images.permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    return x.float().div(255).sub(mean.view(1, -1, 1, 1)).div(std.view(1, -1, 1, 1))


def render(images: Tensor, views: Tensor, spec: ViewSpec, channels_last: bool = False) -> Tensor:
    """The normalised float batch a model sees for uint8 `images` (B, H, W, C) and `views`."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device)
    return normalize(crop_flip(images, views, spec), mean, std, channels_last)


# ----------------------------------------------------------------------------- drawing


def view_of(spec: ViewSpec, seed: int, epoch: int, index: int, generator: torch.Generator | None = None) -> int:
    """The view the standard (torchvision) pipeline draws for sample `index` in `epoch`.

    Replays RandomCrop's and RandomHorizontalFlip's draws from the RNG state that
    `SeededDataset` sets, ``manual_seed(sample_seed(seed, epoch, index))``.
    """
    g = generator if generator is not None else torch.Generator()
    g.manual_seed(sample_seed(seed, epoch, index))
    dy = dx = flip = 0
    if spec.n_offsets > 1:  # get_params draws nothing when the padded image is the crop size
        dy = int(torch.randint(0, spec.n_offsets, (1,), generator=g).item())
        dx = int(torch.randint(0, spec.n_offsets, (1,), generator=g).item())
    if spec.flip:
        flip = int(torch.rand(1, generator=g).item() < FLIP_P)
    return int(spec.encode(dy, dx, flip))


def views_of(spec: ViewSpec, seed: int, epoch: int, indices: Sequence[int] | Tensor) -> Tensor:
    """`view_of` for a batch of sample indices (CPU int64 tensor); ~10 us per sample."""
    g = torch.Generator()
    idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    return torch.tensor([view_of(spec, seed, epoch, int(i), g) for i in idx], dtype=torch.long)


def epoch_views(spec: ViewSpec, seed: int, epoch: int, n: int) -> Tensor:
    """One view per sample index for a whole epoch, drawn at once (the GPU pipeline's draw).

    Uniform over the `num_views` views, i.e. uniform independent offsets and a fair flip:
    the same distribution as torchvision's, from a different random stream. A function of
    (seed, epoch) only, so a resumed epoch gets the same views.
    """
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -2))
    return torch.randint(0, spec.num_views, (n,), generator=g)


__all__ = [
    "UnsupportedAugmentation",
    "ViewSpec",
    "crop_flip",
    "describe_transform",
    "epoch_views",
    "normalize",
    "render",
    "view_of",
    "views_of",
]
