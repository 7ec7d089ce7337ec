"""The data layer: `build_datasets(cfg.data, seed)` -> `DataBundle`.

Datasets (`data.name`): `digits` (bundled with scikit-learn, the offline default),
`cifar10`, `cifar100` (official python archives) and `imagefolder` (torchvision layout);
for `task: detection`, `coco` (COCO-format folders) and `shapes` (generated, COCO-format).
Each file registers its builder in `DATASETS`; `list_datasets()` names them. Nothing is
ever downloaded: missing data is a `DataError` that says which file to put where.
"""
from __future__ import annotations

from kdlab.data.datasets import (
    DATASETS,
    DataBundle,
    RelabeledSubset,
    build_datasets,
    list_datasets,
    register_dataset,
)
from kdlab.data.noise import symmetric_label_noise
from kdlab.data.transforms import AUGMENTS, eval_transform, train_transform

# Importing the dataset modules registers their builders (the detection ones too, so that the
# registry is the same whatever was imported first; their heavy imports are lazy).
from kdlab.data import cifar, coco, digits, folder, shapes  # noqa: E402,F401  isort: skip

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "DataBundle",
    "RelabeledSubset",
    "build_datasets",
    "eval_transform",
    "list_datasets",
    "register_dataset",
    "symmetric_label_noise",
    "train_transform",
]
