"""Writers of small fake datasets in the official on-disk formats, for tests.

- `write_cifar10(root, n_train, n_test)`: `root/cifar-10-batches-py/{data_batch_1..5,
  test_batch, batches.meta}` (or, with ``archive=True``, only `root/cifar-10-python.tar.gz`).
- `write_cifar100(root, n_train, n_test)`: `root/cifar-100-python/{train, test, meta}` with
  `fine_labels` and `coarse_labels` following the official fine -> coarse mapping (or
  `root/cifar-100-python.tar.gz`).
- `write_imagefolder(root, classes, n_per_class, size, splits)`: `root/<split>/<class>/*.png`
  (or .jpg).

The pickles use protocol 2 and the official keys, like the real (Python 2) files. Labels
cycle through the classes before being shuffled, so every class appears once n >= classes.
Images are learnable: each class has its own low-frequency colour pattern plus pixel noise,
with per-channel statistics close to the dataset's real mean/std.
"""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_FINE = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]
#: The official CIFAR-100 fine class -> superclass mapping.
CIFAR100_COARSE_OF = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


def fake_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels cycling through all classes, shuffled."""
    return rng.permutation(np.arange(n) % num_classes)


def fake_images(
    labels: np.ndarray,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> np.ndarray:
    """(N, H, W, 3) uint8 images: a per-class 4x4 colour pattern (upsampled) plus noise."""
    h, w = (size, size) if isinstance(size, int) else (size[1], size[0])
    k = int(num_classes or (int(labels.max()) + 1 if labels.size else 1))
    patterns = np.random.default_rng(12345).normal(0.0, 0.6, size=(k, 4, 4, 3))
    ys = np.minimum(np.arange(h) * 4 // h, 3)
    xs = np.minimum(np.arange(w) * 4 // w, 3)
    base = patterns[labels][:, ys][:, :, xs]  # (N, H, W, 3)
    noise = rng.normal(0.0, 0.8, size=base.shape)
    pixels = np.asarray(mean) + np.asarray(std) * (base + noise)
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def _to_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the official (N, 3072) row layout (R plane, G plane, B plane)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _make_archive(root: Path, folder: Path, archive_name: str, keep_folder: bool) -> Path:
    archive = root / archive_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    if not keep_folder:
        shutil.rmtree(folder)
    return archive


def write_cifar10(
    root: str | Path,
    n_train: int = 50,
    n_test: int = 20,
    *,
    archive: bool = False,
    keep_folder: bool = False,
    seed: int = 0,
) -> Path:
    """Write a fake CIFAR-10 in the official python layout under `root`.

    Returns the folder `root/cifar-10-batches-py`, or with ``archive=True`` the archive
    `root/cifar-10-python.tar.gz` (the folder is removed unless ``keep_folder``). The
    training images are spread over the five `data_batch_*` files.
    """
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mean, std = _CIFAR10_STATS
    for split, n in (("train", n_train), ("test", n_test)):
        labels = fake_labels(n, 10, rng)
        rows = _to_rows(fake_images(labels, 32, mean, std, rng, 10))
        if split == "train":
            parts = np.array_split(np.arange(n), 5)
            files = [(f"data_batch_{i + 1}", idx, f"training batch {i + 1} of 5") for i, idx in enumerate(parts)]
        else:
            files = [("test_batch", np.arange(n), "testing batch 1 of 1")]
        for name, idx, batch_label in files:
            _dump(folder / name, {
                "batch_label": batch_label,
                "labels": [int(v) for v in labels[idx]],
                "data": rows[idx],
                "filenames": [f"fake_{split}_{i:05d}.png" for i in idx],
            })
    _dump(folder / "batches.meta", {
        "num_cases_per_batch": 10000,
        "label_names": list(CIFAR10_CLASSES),
        "num_vis": 3072,
    })
    if archive:
        return _make_archive(root, folder, "cifar-10-python.tar.gz", keep_folder)
    return folder


def write_cifar100(
    root: str | Path,
    n_train: int = 200,
    n_test: int = 100,
    *,
    archive: bool = False,
    keep_folder: bool = False,
    seed: int = 0,
) -> Path:
    """Write a fake CIFAR-100 in the official python layout under `root`.

    Returns `root/cifar-100-python` or, with ``archive=True``, `root/cifar-100-python.tar.gz`.
    `coarse_labels` follow `CIFAR100_COARSE_OF`; use n_train >= 100 so that every fine class
    (and so the whole mapping) appears in the training file.
    """
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mean, std = _CIFAR100_STATS
    for split, n in (("train", n_train), ("test", n_test)):
        labels = fake_labels(n, 100, rng)
        _dump(folder / split, {
            "filenames": [f"fake_{split}_{i:05d}.png" for i in range(n)],
            "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [CIFAR100_COARSE_OF[int(v)] for v in labels],
            "data": _to_rows(fake_images(labels, 32, mean, std, rng, 100)),
        })
    _dump(folder / "meta", {
        "fine_label_names": list(CIFAR100_FINE),
        "coarse_label_names": list(CIFAR100_COARSE),
    })
    if archive:
        return _make_archive(root, folder, "cifar-100-python.tar.gz", keep_folder)
    return folder


def write_imagefolder(
    root: str | Path,
    classes: Sequence[str] | int,
    n_per_class: int,
    size: int | tuple[int, int] = 32,
    splits: Sequence[str] = ("train", "val"),
    *,
    ext: str = "png",
    seed: int = 0,
) -> Path:
    """Write `root/<split>/<class>/<i>.<ext>` images; returns `root`.

    `classes`: names, or a count (names `class_0`, `class_1`, ...). `size`: side, or
    (width, height). `ext`: "png", "jpg" (or "jpeg"), or "mixed" (alternating png/jpg).
    """
    from PIL import Image

    root = Path(root)
    names = [f"class_{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            labels = np.full(n_per_class, c)
            images = fake_images(labels, size, _CIFAR10_STATS[0], _CIFAR10_STATS[1], rng, len(names))
            for i, pixels in enumerate(images):
                suffix = ("png" if i % 2 == 0 else "jpg") if ext == "mixed" else ext
                Image.fromarray(pixels).save(folder / f"{i:04d}.{suffix}")
    return root


def pickle_bytes(obj: object) -> bytes:
    """Protocol-2 pickle bytes (for tests that forge files)."""
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=2)
    return buf.getvalue()
