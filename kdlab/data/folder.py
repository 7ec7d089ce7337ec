"""`imagefolder`: torchvision's ImageFolder layout, one sub-folder per class.

    <root>/<train_split>/<class>/<image>     (train_split: default 'train')
    <root>/<val_split>/<class>/<image>       (val_split: default 'val', else 'test')

Class indices are the positions of the class folder names in sorted order, and both splits
must have the same class folders. Hidden folders (names starting with '.') are ignored.

`data.transform` picks the preset: `imagenet` (default: RandomResizedCrop(224) + flip for
training, Resize(256) + CenterCrop(224) for eval, ImageNet mean/std) or `cifar` (32x32,
RandomCrop(32, padding=4) + flip, CIFAR-10 mean/std; e.g. for the CIFAR-10 JPEG folders).
`data.image_size` sets the side: `imagenet` then crops and resizes any image to it, `cifar` takes
images of exactly that size (checked on the first one).

Image files are decoded when read, not when the folder is opened (an ImageNet folder holds over
a million); one that cannot be decoded (empty, cut short, not an image) is then one
`UnreadableImage` naming it, also when a DataLoader worker read it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from kdlab.schema.experiment import DataConfig
from kdlab.data.datasets import DataBundle, register_dataset, require_root
from kdlab.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Transform,
    check_preset,
    eval_transform,
    preset_size,
    train_transform,
)
from kdlab.errors import DataError

PRESETS = ("imagenet", "cifar")
PRESET_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR10_MEAN, CIFAR10_STD)}


def _layout(train_split: str, val_split: str | None) -> str:
    val = val_split or "val"
    return (
        f"expected layout: <root>/{train_split}/<class>/<image>.jpg and "
        f"<root>/{val}/<class>/<image>.jpg (one folder per class, the same classes in both)"
    )


class UnreadableImage(DataError):
    """An image file that cannot be decoded (empty, truncated, not an image), named with the fix.

    Raised in a DataLoader worker, it reaches the main process rebuilt from a text holding the
    worker's whole traceback (torch's `ExceptionWrapper.reraise` calls `UnreadableImage(text)`);
    the constructor keeps only the message, so the user still reads one line."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_rgb(path: str | Path) -> Image.Image:
    """The image file at `path` as RGB (torchvision's `pil_loader`), or `UnreadableImage`."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all four
        if isinstance(exc, UnidentifiedImageError):
            reason = "it is empty" if os.path.getsize(path) == 0 else "not a format PIL can decode"
        else:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UnreadableImage(f"image file {str(path)!r} cannot be read as an image ({reason}); replace or delete "
                              "it (a file copied only in part, or a page saved as .jpg, looks like this)") from None


class VisibleImageFolder(ImageFolder):
    """ImageFolder that ignores hidden folders such as `.ipynb_checkpoints`; an image file that
    cannot be decoded is one `UnreadableImage` naming it (not PIL's traceback) when it is read."""

    def __init__(self, root: str, transform: Transform | None = None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        return classes, {name: i for i, name in enumerate(classes)}


def open_split(path: Path, transform: Transform, layout: str) -> Any:
    """An ImageFolder over `path`, or a `DataError` naming what is wrong with it."""
    if not path.is_dir():
        raise DataError(f"split folder {str(path)!r} does not exist; {layout}")
    if not any(_is_class(d) for d in path.iterdir()):
        raise DataError(
            f"{str(path)!r} has no class folders; put each class's images in "
            f"'{path}/<class>/' ({layout})"
        )
    try:
        return VisibleImageFolder(str(path), transform=transform)
    except FileNotFoundError:
        empty = [str(d) for d in sorted(path.iterdir()) if _is_class(d) and not _has_image(d)]
        raise DataError(
            f"{str(path)!r} has class folders without images: {', '.join(map(repr, empty))}; "
            f"put image files ({', '.join(IMG_EXTENSIONS)}) in each of them or remove them"
        ) from None


def _is_class(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".")


def _has_image(d: Path) -> bool:
    for _, _, files in os.walk(d, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_image_side(split: Any, size: int) -> None:
    """The cifar transform pads and crops images at their own size, so they must be `size` x
    `size`; the first image is checked (one file: start-up stays fast)."""
    path = split.samples[0][0]
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError):
        return  # the loader names an unreadable file when it reaches it
    if (width, height) != (size, size):
        same = f"set data.image_size={width} if all the images are {width}x{width}, or " if width == height else ""
        raise DataError(
            f"data.transform=cifar takes images of exactly data.image_size={size} pixels a side (it pads and "
            f"crops them at their own size), but {path!r} is {width}x{height}; {same}set data.transform=imagenet, "
            "which resizes any image (random-resized crops of data.image_size)"
        )


@register_dataset("imagefolder")
def build_imagefolder(cfg: DataConfig) -> DataBundle:
    preset = check_preset(cfg.transform or "imagenet", PRESETS, "imagefolder")
    mean, std = PRESET_STATS[preset]
    size = preset_size(preset, cfg.image_size)
    train_tf = train_transform(preset, cfg.augment, mean, std, size)
    eval_tf = eval_transform(preset, mean, std, size)
    layout = _layout(cfg.train_split, cfg.val_split)
    root = require_root(cfg, f"the dataset folder ({layout})")
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder; {layout}")
    if cfg.val_split:
        val_dir = root / cfg.val_split
    else:
        val_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
        if val_dir is None:
            raise DataError(
                f"no validation folder in {str(root)!r}: expected '{root / 'val'}' or "
                f"'{root / 'test'}' (or set data.val_split to its name); {layout}"
            )
    train = open_split(root / cfg.train_split, train_tf, layout)
    val = open_split(val_dir, eval_tf, layout)
    if preset == "cifar":
        check_image_side(train, size)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"class folders differ between {str(root / cfg.train_split)!r} and {str(val_dir)!r}: "
            f"only in train: {only_train or 'none'}, only in val: {only_val or 'none'}; both "
            "splits need the same <class> folders (a class index is its rank in sorted order)"
        )
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(train.classes),
        class_names=list(train.classes),
        input_size=(3, size, size),
        mean=tuple(mean),
        std=tuple(std),
        train_targets=[int(t) for t in train.targets],
    )
