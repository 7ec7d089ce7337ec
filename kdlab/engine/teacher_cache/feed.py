"""The trainer's side of a cache: the teacher logits of the views a batch drew.

Only methods that need the teacher's logits alone can use a cache (`Distiller` with
`needs_teacher_features = False`: KD, DKD, generation training); feature methods such as
ReviewKD cannot. With the standard pipeline the drawn views are replayed from (seed, epoch,
index) as torchvision drew them; the GPU pipeline hands them over with the batch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdlab.schema.experiment import ExperimentConfig
from kdlab.data.arrays import base_of, uint8_image
from kdlab.data.datasets import DataBundle
from kdlab.data.sampling import SeededDataset
from kdlab.data.views import ViewSpec, render, view_of, views_of
from kdlab.engine.teacher_cache.format import WHAT, TeacherCache, open_cache, train_spec
from kdlab.errors import ConfigError, KDLabError


class TeacherFeed:
    """Looks up the cached (fp16-rounded) teacher logits of a batch's drawn views."""

    def __init__(self, cache: TeacherCache, spec: ViewSpec, seed: int, index_map: np.ndarray | None,
                 device: torch.device) -> None:
        self.cache, self.spec, self.seed, self.device = cache, spec, seed, device
        self.index_map = torch.from_numpy(index_map) if index_map is not None else None
        if self.index_map is not None and cache.table is not None:
            self.index_map = self.index_map.to(cache.table.device)

    def logits(self, indices: Tensor, views: Tensor | None, epoch: int) -> Tensor:
        """Float32 teacher logits (B, C) on the training device.

        indices: the samples' indices in the training set (`Batch.indices`). views: the view
        each sample drew (the GPU pipeline's view ids), or None to replay them from (seed,
        epoch, index) as the standard pipeline's transform drew them.
        """
        if views is None:
            views = views_of(self.spec, self.seed, epoch, indices)
        if self.index_map is not None:  # a train subset: rows are indexed by the base set
            indices = self.index_map[indices.to(self.index_map.device)]
        return self.cache.lookup(indices, views, self.device)


def check_method(distiller) -> None:
    """Refuse a cache for a method that uses no teacher or needs more than its logits."""
    name = distiller.cfg.name
    if not distiller.requires_teacher:
        raise ConfigError(f"teacher.cache is set but method {name!r} uses no teacher; remove teacher.cache")
    if distiller.needs_teacher_features:
        raise ConfigError(
            f"teacher.cache is set but method {name!r} needs the teacher's features, not only its logits, "
            "so it cannot train from a teacher-output cache; remove teacher.cache")


def check_view_replay(dataset, spec: ViewSpec, seed: int, samples: int = 2) -> None:
    """Check that `view_of` reproduces the standard pipeline's transform on a few samples.

    Guards the replay of torchvision's random draws: if a release changed them, training
    would look up the logits of views other than the ones drawn.
    """
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
