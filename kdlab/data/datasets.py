"""The dataset registry and `build_datasets`, the one entry point of the data layer.

A dataset file (`digits.py`, `cifar.py`, `folder.py`) registers a builder
``fn(cfg: DataConfig) -> DataBundle`` under its `data.name` with `register_dataset`. A dataset
of another task is registered for that task (`register_dataset("shapes", task="detection")`),
with the builder that task calls; config validation checks that `data.name` serves `task:`.
`build_datasets` looks the name up, calls the builder, then applies the options common to
every dataset, in this order:

1. `train_subset`: keep the first N indices of a permutation of the training set seeded by
   `data.subset_seed`; the kept indices are sorted.
2. `label_noise`: symmetric noise on the (subset's) training labels, seeded by `noise_seed`.

Both wrap the training set in `RelabeledSubset`, which serves the kept samples with the
(possibly corrupted) labels and exposes them as `.targets`. The validation set is never
subsetted or corrupted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from kdlab.schema.experiment import DataConfig
from kdlab.data.noise import symmetric_label_noise
from kdlab.errors import DataError
from kdlab.registry import Registry, UnknownNameError


@dataclass
class DataBundle:
    """A train/val pair and what the model and the methods need to know about it."""

    train: Dataset  # items: (float CxHxW normalised image tensor, int target)
    val: Dataset  # eval transform, no augmentation
    num_classes: int
    class_names: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    coarse_of: list[int] | None = None  # fine class -> coarse class (CIFAR-100); else None
    coarse_names: list[str] | None = None
    train_targets: list[int] = dataclasses.field(default_factory=list)  # after subset/noise


Builder = Callable[[DataConfig], DataBundle]
DATASETS: Registry[Builder] = Registry("dataset")


#: The task each dataset serves, by `data.name`; classification when not registered otherwise.
DATASET_TASKS: dict[str, str] = {}


def register_dataset(name: str, *, task: str = "classification") -> Callable[[Any], Any]:
    """Decorator: register a dataset builder under `name` (the value of `data.name`) for `task`:
    a classification builder is ``fn(cfg: DataConfig) -> DataBundle``, another task's builder
    what that task calls (detection: `kdlab.data.coco.DetectionFiles`)."""
    def decorator(builder: Any) -> Any:
        DATASETS.register(name)(builder)
        DATASET_TASKS[name] = task
        return builder

    return decorator


def dataset_task(name: str) -> str:
    """The task dataset `name` serves (`UnknownNameError` listing the datasets when it is none)."""
    DATASETS.get(name)
    return DATASET_TASKS.get(name, "classification")


class RelabeledSubset(Dataset):
    """`dataset[indices[i]]` with its label replaced by `targets[i]`.

    Attributes: `dataset`, `indices`, `targets` (labels used for training), `clean_targets`
    (the dataset's own labels), `flipped` (True where label noise changed the label),
    `classes` (the base dataset's, when it has them).
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int],
        targets: Sequence[int],
        clean_targets: Sequence[int] | None = None,
        flipped: Sequence[bool] | None = None,
    ):
        if len(indices) != len(targets):
            raise ValueError("indices and targets must have the same length")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = [int(t) for t in targets]
        self.clean_targets = [int(t) for t in (clean_targets if clean_targets is not None else targets)]
        self.flipped = [bool(f) for f in flipped] if flipped is not None else [False] * len(self.indices)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, _ = self.dataset[self.indices[i]]
        return image, self.targets[i]


def require_root(cfg: DataConfig, expected: str) -> Path:
    """`cfg.root` as an existing path, or a `DataError` that says what to put there."""
    if not cfg.root:
        raise DataError(
            f"data.root is not set for dataset {cfg.name!r}; set data.root to {expected}"
        )
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(
            f"data.root {str(root)!r} does not exist; set data.root to {expected}"
        )
    return root


def _targets_of(dataset: Dataset) -> list[int]:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no .targets")
    return [int(t) for t in targets]


def apply_subset_and_noise(bundle: DataBundle, cfg: DataConfig, seed: int) -> DataBundle:
    """Apply `train_subset` and `label_noise` to the training set (see module docstring)."""
    clean = _targets_of(bundle.train)
    n = len(clean)
    indices = list(range(n))
    if cfg.train_subset is not None:
        if cfg.train_subset > n:
            raise DataError(
                f"data.train_subset={cfg.train_subset} is larger than the {n} training "
                f"samples of dataset {cfg.name!r}; set data.train_subset to at most {n} "
                "(or remove it to use them all)"
            )
        perm = np.random.default_rng(seed).permutation(n)
        indices = sorted(int(i) for i in perm[: cfg.train_subset])
    kept_clean = [clean[i] for i in indices]
    targets, flipped = kept_clean, None
    if cfg.label_noise > 0:
        if bundle.num_classes < 2:
            raise DataError(
                f"data.label_noise needs at least 2 classes, dataset {cfg.name!r} has "
                f"{bundle.num_classes}; set data.label_noise to 0"
            )
        targets, flipped = symmetric_label_noise(
            kept_clean, bundle.num_classes, float(cfg.label_noise), cfg.noise_seed
        )
    train = bundle.train
    if cfg.train_subset is not None or flipped is not None:
        train = RelabeledSubset(bundle.train, indices, targets, kept_clean, flipped)
    return dataclasses.replace(bundle, train=train, train_targets=list(targets))


def build_datasets(cfg: DataConfig, seed: int | None = None) -> DataBundle:
    """Build the train and val datasets that `cfg` describes.

    The `train_subset` samples are chosen with `cfg.subset_seed` (or `seed` when given), not
    with the training seed, so runs that differ only in `train.seed` (multi-seed runs,
    generations) train on the same samples. The digits train/val split and the label noise
    (`cfg.noise_seed`) have their own fixed seeds.
    Raises `DataError` for anything the user can fix (unknown name, missing files, ...).
    """
    try:
        builder, task = DATASETS.get(cfg.name), dataset_task(cfg.name)
    except UnknownNameError as err:
        raise DataError(f"{err}; set data.name to one of these") from None
    if task != "classification":
        raise DataError(f"data.name={cfg.name!r} is a {task} dataset; set task: {task}, or pick a classification "
                        f"dataset ({', '.join(n for n in DATASETS.names() if dataset_task(n) == 'classification')})")
    bundle = builder(cfg)
    return apply_subset_and_noise(bundle, cfg, cfg.subset_seed if seed is None else seed)


def list_datasets() -> list[str]:
    """Names accepted by `data.name`."""
    return DATASETS.names()
