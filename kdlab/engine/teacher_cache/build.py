"""Building a cache: the frozen teacher on every view of every base training image."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdlab.schema.experiment import ExperimentConfig
from kdlab.data import build_datasets
from kdlab.data.arrays import base_of, uint8_images
from kdlab.data.views import render
from kdlab.engine.build import build_teacher
from kdlab.engine.callbacks import bars_wanted
from kdlab.engine.evaluate import autocast_context
from kdlab.engine.teacher_cache.format import LOGITS_FILE, META_FILE, WHAT, expected_meta, train_spec
from kdlab.errors import ConfigError, KDLabError


@torch.no_grad()
def build_cache(cfg: ExperimentConfig, path: str | Path, *, device: torch.device, batch_size: int = 1024,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Run the config's teacher on every view of every base training image; write the cache.

    The logits are stored rounded to float16 (see docs/speed.md for the loss error that
    causes). `batch_size`: views per teacher forward (rounded to whole images). `device`: where
    the teacher runs (`kdlab cache-teacher` passes the config's `train.device`); uses the
    config's `train.amp` and `train.channels_last`.
    """
    if cfg.teacher is None:
        raise ConfigError("kdlab cache-teacher needs a config with a 'teacher:' section (name and checkpoint)")
    path = Path(path)
    if path.exists() and not overwrite:
        raise KDLabError(f"teacher cache {str(path)!r} already exists; pass --overwrite to rebuild it, "
                         "or choose another path with teacher.cache=PATH")
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
                   disable=not bars_wanted(progress), dynamic_ncols=True)
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
