"""Exact teacher-output cache: the frozen teacher's logits for every view of every image.

The teacher never changes, and CIFAR's augmentation has 162 views per image (see
`kdlab.data.views`), so its logits can be computed once for all of them and reused by
every student, seed and hyper-parameter sweep distilled from it. Training then looks up the
logits of the view each sample drew instead of running the teacher: a KD or DKD step costs
about a student step.

On disk a cache is a folder:

    logits.f16   float16 (N, V, C), row-major, memory-mapped (N base training images,
                 V views, C classes): N * V * C * 2 bytes (CIFAR-100: 50,000 * 162 * 100
                 * 2 = 1.62 GB; CIFAR-10: 162 MB)
    meta.json    format/version, the teacher's name and checkpoint SHA-256, the dataset's
                 name, size and pixel fingerprint, the augmentation (`ViewSpec`), shape

It is written to a temporary folder and renamed into place, so an interrupted build never
leaves a cache that looks complete. Opening checks everything in meta.json against the
config and refuses a stale cache (another teacher checkpoint, dataset or augmentation)
with one message saying how to rebuild it.

Rows are indexed by the *base* training set (before `data.train_subset`), so one cache
serves every subset and seed. Only methods that need the teacher's logits alone
(`Distiller.logits_only`: KD, DKD, generation training) can use it; feature methods such
as ReviewKD cannot, and continuous augmentations (RandomResizedCrop, AutoAugment) have no
finite view set: both are refused.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdlab.config.schema import ExperimentConfig
from kdlab.data.arrays import base_of, uint8_image, uint8_images
from kdlab.data.datasets import DataBundle
from kdlab.data.gpu_pipeline import check_image_size, dataset_spec
from kdlab.data.views import ViewSpec, render, view_of, views_of
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
    """What a cache for this config must record (the fields `open_cache` compares)."""
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


def rebuild_hint(path: str | Path) -> str:
    return (f"rebuild it with 'kdlab cache-teacher CONFIG teacher.cache={path} --force' "
            "(the same config as training), or remove teacher.cache to run the teacher")


# ----------------------------------------------------------------------------- building


@torch.no_grad()
def build_cache(cfg: ExperimentConfig, path: str | Path, *, batch_size: int = 1024, overwrite: bool = False,
                progress: bool = True, device: torch.device | None = None) -> Path:
    """Run the config's teacher on every view of every base training image; write the cache.

    `batch_size`: views per teacher forward (rounded to whole images). Uses the config's
    `train.device`, `train.amp` and `train.channels_last`.
    """
    from tqdm.auto import tqdm

    from kdlab.data import build_datasets
    from kdlab.engine.build import build_teacher
    from kdlab.engine.evaluate import autocast_context
    from kdlab.engine.trainer import resolve_device

    if cfg.teacher is None:
        raise ConfigError("kdlab cache-teacher needs a config with a 'teacher:' section (name and checkpoint)")
    path = Path(path)
    if path.exists() and not overwrite:
        raise KDLabError(f"teacher cache {str(path)!r} already exists; pass --force to rebuild it, "
                         "or choose another path with teacher.cache=PATH")
    device = device or resolve_device(cfg.train.device)
    data = build_datasets(cfg.data)
    spec = train_spec(data)
    meta = expected_meta(cfg, data, spec)
    base, _ = base_of(data.train)
    pixels = uint8_images(base, WHAT)
    n, v, c = meta["shape"]
    teacher = build_teacher(cfg, data.num_classes).to(device).eval()
    if cfg.train.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    meta["amp"] = cfg.train.amp
    per_batch = max(1, batch_size // v)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        mm = np.memmap(tmp / LOGITS_FILE, dtype=np.float16, mode="w+", shape=(n, v, c))
        bar = tqdm(total=n, desc=f"caching {cfg.teacher.name}, {spec.describe()}", unit="img",
                   disable=not progress, dynamic_ncols=True)
        for start in range(0, n, per_batch):
            chunk = torch.from_numpy(pixels[start:start + per_batch]).to(device)
            # Every view of every image, image-major: row i * V + j is image i's view j.
            views = torch.arange(v, device=device).repeat(len(chunk))
            x = render(chunk.repeat_interleave(v, dim=0), views, spec, cfg.train.channels_last)
            with autocast_context(device, cfg.train.amp):
                logits = teacher(x)
            half = logits.float().reshape(len(chunk), v, c).half()
            if not torch.isfinite(half).all():
                raise KDLabError(f"teacher {cfg.teacher.name!r} gives logits beyond float16's range "
                                 "(|z| > 65504) on some images; the cache cannot store them, train without teacher.cache")
            mm[start:start + len(chunk)] = half.cpu().numpy()
            bar.update(len(chunk))
        bar.close()
        mm.flush()
        del mm
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- reading


class TeacherCache:
    """An opened cache: `lookup(base_indices, views)` -> float32 teacher logits (B, C)."""

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


# ----------------------------------------------------------------------------- training


class TeacherFeed:
    """The trainer's side of the cache: the teacher logits of a batch's drawn views.

    Batches of the GPU pipeline carry their view ids (4th element); for the standard
    pipeline they are replayed from (seed, epoch, index) with `views_of`.
    """

    def __init__(self, cache: TeacherCache, spec: ViewSpec, seed: int, index_map: np.ndarray | None,
                 device: torch.device) -> None:
        self.cache, self.spec, self.seed, self.device = cache, spec, seed, device
        self.index_map = torch.from_numpy(index_map) if index_map is not None else None
        if self.index_map is not None and cache.table is not None:
            self.index_map = self.index_map.to(cache.table.device)

    def logits(self, batch: tuple, epoch: int) -> Tensor:
        indices = batch[2]
        views = batch[3] if len(batch) > 3 else views_of(self.spec, self.seed, epoch, indices)
        if self.index_map is not None:
            indices = self.index_map[indices.to(self.index_map.device)]
        return self.cache.lookup(indices, views, self.device)


def check_method(distiller) -> None:
    name = distiller.cfg.name
    if not distiller.requires_teacher:
        raise ConfigError(f"teacher.cache is set but method {name!r} uses no teacher; remove teacher.cache")
    if not distiller.logits_only:
        raise ConfigError(
            f"teacher.cache is set but method {name!r} needs the teacher's features, not only its logits, "
            "so it cannot train from a teacher-output cache; remove teacher.cache")


def check_view_replay(dataset, spec: ViewSpec, seed: int, samples: int = 2) -> None:
    """Check that `view_of` reproduces the standard pipeline's transform on a few samples.

    Guards the replay of torchvision's random draws: if a release changed them, training
    would look up the logits of views other than the ones drawn.
    """
    from kdlab.engine.sampling import SeededDataset

    seeded = SeededDataset(dataset, seed)
    base, index = base_of(dataset)
    for i in range(min(samples, len(dataset))):
        image = seeded[(1, i)][0]
        b = int(index[i]) if index is not None else i
        pixels = torch.from_numpy(np.array(uint8_image(base, b, WHAT)))[None]  # a writable copy
        expected = render(pixels, torch.tensor([view_of(spec, seed, 1, i)]), spec)[0]
        if not torch.allclose(image, expected, atol=1e-5):
            raise KDLabError(
                "teacher.cache: the training transform's random draws could not be replayed (this "
                "torchvision version draws crop/flip differently), so the drawn views are unknown; use "
                "data.pipeline=gpu, which draws the views itself, or remove teacher.cache")


def teacher_feed(cfg: ExperimentConfig, data: DataBundle, distiller, device: torch.device) -> TeacherFeed | None:
    """The trainer's `TeacherFeed`, or None when `teacher.cache` is not set."""
    if cfg.teacher is None or not cfg.teacher.cache:
        return None
    check_method(distiller)
    spec = train_spec(data)
    cache = open_cache(cfg, data, spec)
    if cfg.data.pipeline == "gpu":
        if device.type != "cpu":
            cache.to_device(device)  # everything on the device, like the images
    else:
        check_view_replay(data.train, spec, cfg.train.seed)
    _, index_map = base_of(data.train)
    return TeacherFeed(cache, spec, cfg.train.seed, index_map, device)


__all__ = [
    "StaleCacheError",
    "TeacherCache",
    "TeacherFeed",
    "build_cache",
    "check_method",
    "check_view_replay",
    "expected_meta",
    "open_cache",
    "teacher_feed",
]
