"""The cache on disk: file layout, meta.json, identity hashes, reading and stale-cache checks.

A cache is a folder:

    logits.f16   float16 (N, V, C), row-major, memory-mapped (N base training images,
                 V views, C classes): N * V * C * 2 bytes (CIFAR-100: 50,000 * 162 * 100
                 * 2 = 1.62 GB; CIFAR-10: 162 MB)
    meta.json    format/version, the teacher's name and checkpoint SHA-256, the dataset's
                 name, size and pixel fingerprint, the augmentation (`ViewSpec`), shape

Rows are indexed by the *base* training set (before `data.train_subset`), so one cache
serves every subset and seed. Opening checks everything in meta.json against the config and
refuses a stale cache (another teacher checkpoint, dataset or augmentation) with one message
saying how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdlab.schema.experiment import ExperimentConfig
from kdlab.data.arrays import base_of, uint8_image, uint8_images
from kdlab.data.datasets import DataBundle
from kdlab.data.gpu_pipeline import check_image_size, dataset_spec
from kdlab.data.views import ViewSpec
from kdlab.errors import ConfigError, DataError, KDLabError

FORMAT = "kdlab-teacher-cache"
VERSION = 1
LOGITS_FILE = "logits.f16"
META_FILE = "meta.json"
#: Images whose pixels are hashed into the dataset fingerprint (evenly spaced).
FINGERPRINT_SAMPLES = 64
WHAT = "teacher.cache"


class StaleCacheError(KDLabError):
    """The cache was built for another teacher, dataset or augmentation."""


# ----------------------------------------------------------------------------- identity


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_file(cfg: ExperimentConfig) -> str:
    assert cfg.teacher is not None
    path = cfg.teacher.checkpoint or cfg.teacher.weights
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"the teacher-output cache identifies the teacher by its checkpoint file, but "
            f"teacher.checkpoint {path!r} is not a file; set teacher.checkpoint to the teacher's best.pt"
        )
    return str(path)


def dataset_fingerprint(base) -> str:
    """SHA-256 of the dataset size and the pixels of `FINGERPRINT_SAMPLES` evenly spaced images."""
    n = len(base)
    picks = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_SAMPLES)).astype(np.int64))
    h = hashlib.sha256(str(n).encode())
    h.update(np.ascontiguousarray(uint8_images(base, WHAT, picks)).tobytes())
    return h.hexdigest()


def expected_meta(cfg: ExperimentConfig, data: DataBundle, spec: ViewSpec) -> dict[str, Any]:
    """What a cache for this config must record (the fields `TeacherCache.check` compares)."""
    assert cfg.teacher is not None
    base, _ = base_of(data.train)
    path = teacher_file(cfg)
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"name": cfg.teacher.name, "sha256": file_sha256(path), "checkpoint": path},
        "dataset": {"name": cfg.data.name, "num_images": len(base), "fingerprint": dataset_fingerprint(base)},
        "augmentation": spec.to_json(),
        "num_classes": int(data.num_classes),
        "shape": [len(base), spec.num_views, int(data.num_classes)],
        "dtype": "float16",
    }


def train_spec(data: DataBundle) -> ViewSpec:
    """The training set's `ViewSpec`, or a `DataError` when the cache cannot apply to it."""
    fix = ("the cache applies only to crop/flip views of uint8 images (cifar10, cifar100, or imagefolder "
           "with data.transform=cifar; data.augment standard or none), not to continuous augmentations: "
           "remove teacher.cache")
    spec = dataset_spec(data.train, int(data.input_size[-1]), WHAT, fix)
    base, _ = base_of(data.train)
    check_image_size(uint8_image(base, 0, WHAT).shape, spec, WHAT, "remove teacher.cache")
    return spec


def cache_is_complete(path: str | Path, cfg: ExperimentConfig | None = None) -> bool:
    """True when `path` holds a whole cache (its sidecar and logits) of this format and, given
    `cfg`, built from the checkpoint file `cfg`'s teacher names now (a retrained teacher makes
    it stale). A plan (`kdlab.plan`) builds a cache only when this is False."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not (path / LOGITS_FILE).is_file() or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return False
    if cfg is None or cfg.teacher is None:
        return True
    source = teacher_file(cfg)
    return not Path(source).is_file() or meta.get("teacher", {}).get("sha256") == file_sha256(source)


def rebuild_hint(path: str | Path) -> str:
    return (f"rebuild it with 'kdlab cache-teacher CONFIG teacher.cache={path} --overwrite' "
            "(the same config as training), or remove teacher.cache to run the teacher")


# ----------------------------------------------------------------------------- reading


class TeacherCache:
    """An opened cache: `lookup(base_indices, views)` -> float32 teacher logits (B, C),
    the fp16-rounded values the cache stores."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file() or not (self.path / LOGITS_FILE).is_file():
            raise DataError(f"teacher cache {str(self.path)!r} does not exist or is incomplete "
                            f"(no {META_FILE} and {LOGITS_FILE}); " + rebuild_hint(self.path))
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise StaleCacheError(f"{str(self.path)!r} is not a version-{VERSION} kdlab teacher cache; "
                                  + rebuild_hint(self.path))
        self.shape = tuple(self.meta["shape"])
        self.logits = np.memmap(self.path / LOGITS_FILE, dtype=np.float16, mode="r", shape=self.shape)
        self.table: Tensor | None = None

    def to_device(self, device: torch.device) -> "TeacherCache":
        """Load the whole table into `device` memory (N * V * C * 2 bytes): lookups become a gather."""
        table = torch.empty(self.shape, dtype=torch.float16, device=device)
        step = max(1, (64 << 20) // max(1, self.shape[1] * self.shape[2] * 2))  # ~64 MB host copies
        for start in range(0, self.shape[0], step):
            table[start:start + step].copy_(torch.from_numpy(np.array(self.logits[start:start + step])))
        self.table = table
        return self

    def lookup(self, base_indices: Tensor, views: Tensor, device: torch.device | str = "cpu") -> Tensor:
        if self.table is not None:
            return self.table[base_indices.to(self.table.device), views.to(self.table.device)].float()
        rows = self.logits[base_indices.cpu().numpy(), views.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows)).to(device).float()

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse (`StaleCacheError`) when the cache was built for something else."""
        meta, hint = self.meta, rebuild_hint(self.path)
        where = f"teacher cache {str(self.path)!r}"
        if any(meta["teacher"][k] != expected["teacher"][k] for k in ("sha256", "name")):
            raise StaleCacheError(
                f"{where} is stale: it was built from teacher {meta['teacher']['name']!r} with checkpoint sha256 "
                f"{meta['teacher']['sha256'][:12]}..., but teacher.checkpoint {expected['teacher']['checkpoint']!r} "
                f"({expected['teacher']['name']!r}) has sha256 {expected['teacher']['sha256'][:12]}...; {hint}")
        if meta["dataset"] != {k: expected["dataset"][k] for k in meta["dataset"]}:
            raise StaleCacheError(
                f"{where} was built for dataset {meta['dataset']['name']!r} ({meta['dataset']['num_images']} "
                f"images), which is not this config's {expected['dataset']['name']!r} "
                f"({expected['dataset']['num_images']} images, or other pixels); {hint}")
        if meta["augmentation"] != expected["augmentation"]:
            raise StaleCacheError(
                f"{where} was built for augmentation {meta['augmentation']}, but training uses "
                f"{expected['augmentation']}; {hint}")
        if tuple(meta["shape"]) != tuple(expected["shape"]):
            raise StaleCacheError(f"{where} has shape {meta['shape']}, expected {expected['shape']}; {hint}")


def open_cache(cfg: ExperimentConfig, data: DataBundle, spec: ViewSpec | None = None) -> TeacherCache:
    """Open `cfg.teacher.cache` and verify it was built for this teacher, data and augmentation."""
    assert cfg.teacher is not None and cfg.teacher.cache
    cache = TeacherCache(cfg.teacher.cache)
    cache.check(expected_meta(cfg, data, spec or train_spec(data)))
    return cache
