"""Image transforms: presets (input size, eval pipeline) and training augmentations.

A *preset* fixes the geometry the model sees and the evaluation pipeline:

- ``cifar``: 32x32 images; eval = ToTensor + Normalize.
- ``imagenet``: 224x224 crops; eval = Resize(256) + CenterCrop(224) + ToTensor + Normalize.
- ``digits``: the in-memory digits tensors (already normalised, 16x16 by default); eval = identity.

`data.image_size` replaces the preset's side (`preset_size`) and everything derived from it: the
cifar crop's padding (size/8), the imagenet crops and evaluation resize (size * 256/224), the
digits' upsampling. The presets are its special cases: cifar at 32, imagenet at 224.

An *augment* (``data.augment``) picks the training pipeline. Each one is a function
``fn(preset, mean, std, size) -> transform`` registered in `AUGMENTS`; `train_transform`
looks it up, so adding a policy is one registration (see `_standard` and the helpers
`geometric_augment` / `to_normalized_tensor`). For example AutoAugment's CIFAR-10 policy, which
is registered below as ``augment: autoaugment`` (DKD Table 2) in essentially this form::

    @AUGMENTS.register("autoaugment")
    def _autoaugment(preset, mean, std, size):
        policy = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)
        return T.Compose(geometric_augment(preset, size) + [policy] + to_normalized_tensor(mean, std))

(`T` is `torchvision.transforms`.)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision import transforms as T

from kdlab.errors import DataError
from kdlab.registry import Registry, UnknownNameError

Transform = Callable[[Any], Any]
AugmentFn = Callable[[str, Sequence[float], Sequence[float], int], Transform]

#: Square side (pixels) of the model input for each preset.
PRESET_SIZES: dict[str, int] = {"cifar": 32, "imagenet": 224, "digits": 16}
#: Zero-padding of the random crop for the small-image presets.
CROP_PADDING: dict[str, int] = {"cifar": 4, "digits": 2}
#: Eval resize ratio of the imagenet preset (Resize(256) before CenterCrop(224)).
IMAGENET_RESIZE_RATIO = 256 / 224

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTS: Registry[AugmentFn] = Registry("data.augment value")


def check_preset(preset: str, allowed: Sequence[str], dataset: str) -> str:
    """Validate `data.transform` for `dataset`; return the preset or raise `DataError`."""
    if preset not in allowed:
        raise DataError(
            f"data.transform {preset!r} is not available for dataset {dataset!r}; "
            f"set data.transform to one of: {', '.join(allowed)} (or leave it unset for "
            f"the default {allowed[0]!r})"
        )
    return preset


def preset_size(preset: str, size: int | None = None) -> int:
    """The square side the model sees: `size` (`data.image_size`) or the preset's own."""
    return int(size) if size is not None else PRESET_SIZES[preset]


def crop_padding(preset: str, size: int) -> int:
    """Zero padding of a small-image preset's random crop, scaled with the side: 4 at CIFAR's 32
    (8 at 64), 2 at the digits' 16."""
    return max(1, round(CROP_PADDING[preset] * size / PRESET_SIZES[preset]))


class TensorRandomCrop:
    """Random crop with constant padding for an already-normalised CxHxW tensor.

    `fill` is the per-channel value of the padding (the normalised value of a black pixel,
    ``-mean/std``), so padding looks like zero padding applied before normalisation.
    Cheap enough to run per item: one small allocation and a copy.
    """

    def __init__(self, size: int, padding: int, fill: Sequence[float]):
        self.size = int(size)
        self.padding = int(padding)
        self.fill = torch.tensor([float(f) for f in fill], dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        p, s = self.padding, self.size
        padded = self.fill[:c].view(c, 1, 1).expand(c, h + 2 * p, w + 2 * p).clone()
        padded[:, p : p + h, p : p + w] = x
        top = int(torch.randint(0, h + 2 * p - s + 1, ()).item())
        left = int(torch.randint(0, w + 2 * p - s + 1, ()).item())
        return padded[:, top : top + s, left : left + s].contiguous()

    def __repr__(self) -> str:
        return f"TensorRandomCrop(size={self.size}, padding={self.padding})"


class Identity:
    def __call__(self, x: Any) -> Any:
        return x

    def __repr__(self) -> str:
        return "Identity()"


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    """The common tail of the PIL pipelines: ToTensor + Normalize."""
    return [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]


def geometric_augment(preset: str, size: int | None = None) -> list[Transform]:
    """The standard geometric augmentation of a PIL preset (before ToTensor).

    cifar: RandomCrop(size, padding=size/8, 4 at 32) + RandomHorizontalFlip.
    imagenet: RandomResizedCrop(size) + RandomHorizontalFlip.
    """
    size = preset_size(preset, size)
    if preset == "cifar":
        return [T.RandomCrop(size, padding=crop_padding("cifar", size)), T.RandomHorizontalFlip()]
    if preset == "imagenet":
        return [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    raise ValueError(f"geometric_augment: no PIL augmentation for preset {preset!r}")


def eval_transform(
    preset: str, mean: Sequence[float], std: Sequence[float], size: int | None = None
) -> Transform:
    """The evaluation (and `augment: none`) pipeline of a preset."""
    size = preset_size(preset, size)
    if preset == "digits":
        return Identity()  # the digits tensors are stored normalised at the right size
    if preset == "cifar":
        return T.Compose(to_normalized_tensor(mean, std))
    if preset == "imagenet":
        resize = int(round(size * IMAGENET_RESIZE_RATIO))
        return T.Compose([T.Resize(resize), T.CenterCrop(size)] + to_normalized_tensor(mean, std))
    raise ValueError(f"unknown transform preset {preset!r}; known: {', '.join(PRESET_SIZES)}")


@AUGMENTS.register("standard")
def _standard(preset: str, mean: Sequence[float], std: Sequence[float], size: int) -> Transform:
    if preset == "digits":
        # No flips: digits are not flip-invariant.
        # Padding 2 at the default 16x16, scaled with the size (4 at 32x32).
        fill = [-m / s for m, s in zip(mean, std)]
        return TensorRandomCrop(size, crop_padding("digits", size), fill)
    return T.Compose(geometric_augment(preset, size) + to_normalized_tensor(mean, std))


@AUGMENTS.register("none")
def _none(preset: str, mean: Sequence[float], std: Sequence[float], size: int) -> Transform:
    return eval_transform(preset, mean, std, size)


@AUGMENTS.register("autoaugment")
def _autoaugment(preset: str, mean: Sequence[float], std: Sequence[float], size: int) -> Transform:
    """Standard crop + flip, then torchvision's AutoAugment policy, then ToTensor + Normalize
    (training only; evaluation keeps `eval_transform`). DKD Table 2's strong augmentation.

    The policy goes after the geometric augmentation, as in Cubuk et al. (its CIFAR policy was
    searched on top of crop + flip), and before ToTensor because its colour ops (posterize,
    solarize, equalize) work on uint8 pixels, not normalised floats. Policy: CIFAR10 for the
    cifar preset (the DKD setting), IMAGENET for the imagenet preset. Its random draws use the
    torch RNG, which `SeededDataset` seeds per sample, so runs stay reproducible."""
    if preset == "digits":
        raise DataError(
            "data.augment='autoaugment' needs PIL images (the cifar or imagenet preset), but the "
            "digits preset serves normalised tensors; set data.augment=standard for digits"
        )
    policy = T.AutoAugmentPolicy.CIFAR10 if preset == "cifar" else T.AutoAugmentPolicy.IMAGENET
    return T.Compose(geometric_augment(preset, size) + [T.AutoAugment(policy)] + to_normalized_tensor(mean, std))


def check_augment(augment: str) -> AugmentFn:
    """The registered augment function for `augment`, or a `DataError` listing valid names."""
    try:
        return AUGMENTS.get(augment)
    except UnknownNameError as err:
        raise DataError(f"{err}; set data.augment to one of these") from None


def train_transform(
    preset: str,
    augment: str,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
) -> Transform:
    """The training pipeline: augmentation `augment` for input preset `preset`.

    `size` is the square side the model sees (default: the preset's, see `PRESET_SIZES`).
    Raises `DataError` for an unknown `augment`.
    """
    fn = check_augment(augment)
    if preset not in PRESET_SIZES:
        raise ValueError(f"unknown transform preset {preset!r}; known: {', '.join(PRESET_SIZES)}")
    return fn(preset, tuple(mean), tuple(std), preset_size(preset, size))
