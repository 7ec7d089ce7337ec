"""The fp16-rounded teacher-output cache: built once, looked up per drawn view, refused when stale."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import load_config
from kdlab.data import build_datasets
from kdlab.data.arrays import base_of
from kdlab.data.views import UnsupportedAugmentation, describe_transform, views_of
from kdlab.engine.build import build_teacher
from kdlab.data.sampling import SeededDataset
from kdlab.engine.teacher_cache import (
    StaleCacheError,
    TeacherCache,
    TeacherFeed,
    build_cache,
    check_method,
    open_cache,
    train_spec,
)
from kdlab.engine.trainer import Trainer
from kdlab.errors import ConfigError, DataError, KDLabError
from kdlab.losses import dkd_loss, kd_loss
from kdlab.methods import method_class

try:
    from tests.fakedata import write_cifar10, write_imagefolder
    from tests.speedkit import tiny_model_registered, write_teacher
except ImportError:  # tests/ itself on sys.path
    from fakedata import write_cifar10, write_imagefolder  # type: ignore[no-redef]
    from speedkit import tiny_model_registered, write_teacher  # type: ignore[no-redef]

N_TRAIN = 12
VIEWS = 162
CLASSES = 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fake CIFAR-10, a tiny teacher checkpoint and its cache, built through the CLI."""
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("cache")
    write_cifar10(tmp / "data", N_TRAIN, 8)
    with tiny_model_registered() as tiny:
        teacher = write_teacher(tmp / "teacher.pt", tiny)

        def config(**sections):
            base = tiny_config(
                tmp,
                model={"name": tiny},
                teacher={"name": tiny, "checkpoint": str(teacher), "cache": str(tmp / "cache")},
                method={"name": "kd"},
                data={"name": "cifar10", "root": str(tmp / "data"), "train_subset": None, "batch_size": 4},
                train={"deterministic": True},
            )
            from kdlab.config import deep_merge

            return deep_merge(base, sections)

        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(config()))
        assert main(["cache-teacher", str(path)]) == 0
        yield SimpleNamespace(tmp=tmp, teacher=teacher, cache=tmp / "cache", config=config, tiny=tiny)


def test_cache_file_holds_every_view_in_fp16(env):
    cache = TeacherCache(env.cache)
    assert cache.logits.dtype == np.float16
    assert cache.shape == (N_TRAIN, VIEWS, CLASSES)
    assert (env.cache / "logits.f16").stat().st_size == N_TRAIN * VIEWS * CLASSES * 2
    assert cache.meta["augmentation"]["padding"] == 4 and cache.meta["augmentation"]["flip"] is True
    assert len(cache.meta["teacher"]["sha256"]) == 64
    # Views differ from one another (a cache of one repeated view would pass nothing below).
    assert float(np.abs(np.diff(cache.logits[0].astype(np.float32), axis=0)).max()) > 1e-2


def test_cached_logits_and_losses_equal_online_for_the_drawn_views(env):
    cfg = load_config(data=env.config())
    data = build_datasets(cfg.data, cfg.train.seed)
    cache = open_cache(cfg, data)
    spec = train_spec(data)
    teacher = build_teacher(cfg, CLASSES).eval()
    seeded = SeededDataset(data.train, cfg.train.seed)
    idx = torch.arange(N_TRAIN)
    targets = torch.tensor(data.train.targets)
    student = torch.randn(N_TRAIN, CLASSES, generator=torch.Generator().manual_seed(0)) * 3
    for epoch in (1, 2):
        images = torch.stack([seeded[(epoch, i)][0] for i in range(N_TRAIN)])  # the standard pipeline
        with torch.no_grad():
            online = teacher(images)
        views = views_of(spec, cfg.train.seed, epoch, idx)
        cached = cache.lookup(idx, views)
        # fp16-rounded: round-to-nearest with an 11-bit significand is off by at most 2^-11
        # relative (+ a float32 margin: the build ran the teacher on other batches).
        assert ((cached - online).abs() <= online.abs() * 2.0**-11 + 1e-5).all()
        assert float((cached - online).abs().max()) > 0  # and really rounded, not float32
        tol = 2e-3 * float(online.abs().max())
        for loss in (lambda t: kd_loss(student, t, 4.0), lambda t: dkd_loss(student, t, targets, 1.0, 8.0, 4.0)):
            a, b = loss(cached), loss(online)
            assert abs(float(a) - float(b)) <= 5e-4 * abs(float(b))  # docs/speed.md: measured <= 3e-4
        # Another view's logits are not within tolerance: the lookup depends on the drawn view.
        wrong = cache.lookup(idx, (views + 1) % VIEWS)
        assert not torch.allclose(wrong, online, rtol=0, atol=tol)


@pytest.mark.parametrize("pipeline", ["standard", "gpu"])
def test_training_from_the_cache_matches_online_training(env, pipeline, device):
    # A subset exercises the subset -> base-index mapping of the lookups. On CUDA the cache
    # (built on CPU) is loaded into device memory and the online teacher runs there.
    data, train = {"train_subset": 8, "pipeline": pipeline}, {"device": device}
    online = Trainer(load_config(data=env.config(data=data, train=train, teacher={"cache": None},
                                                 name=f"online_{pipeline}_{device}"))).fit()
    cached = Trainer(load_config(data=env.config(data=data, train=train, name=f"cached_{pipeline}_{device}"))).fit()
    a, b = online.history[0], cached.history[0]
    for key in ("train/loss", "train/kd", "train/ce", "val/loss"):
        assert abs(a[key] - b[key]) <= 2e-3 * abs(a[key]) + 1e-5, key


def test_stale_teacher_checkpoint_is_refused(env):
    other = write_teacher(env.tmp / "other_teacher.pt", env.tiny, seed=1)
    cfg = load_config(data=env.config(teacher={"checkpoint": str(other)}))
    data = build_datasets(cfg.data, cfg.train.seed)
    with pytest.raises(StaleCacheError, match=r"stale.*sha256.*kdlab cache-teacher"):
        open_cache(cfg, data)


def test_other_dataset_is_refused(env):
    write_cifar10(env.tmp / "data2", N_TRAIN, 8, seed=1)  # same size, other pixels
    cfg = load_config(data=env.config(data={"root": str(env.tmp / "data2")}))
    with pytest.raises(StaleCacheError, match="dataset"):
        open_cache(cfg, build_datasets(cfg.data, 0))


def test_missing_cache_is_refused_with_the_build_command(env):
    cfg = load_config(data=env.config(teacher={"cache": str(env.tmp / "nowhere")}))
    with pytest.raises(DataError, match="does not exist.*kdlab cache-teacher"):
        open_cache(cfg, build_datasets(cfg.data, 0))


def test_existing_cache_is_not_overwritten_without_force(env):
    cfg = load_config(data=env.config())
    with pytest.raises(KDLabError, match="--overwrite"):
        build_cache(cfg, env.cache, device=CPU, progress=False)


def test_continuous_augmentation_is_refused(env, tmp_path):
    write_imagefolder(tmp_path / "folder", 2, 2, size=32)
    teacher = write_teacher(tmp_path / "t2.pt", env.tiny, num_classes=2)
    # imagefolder's default preset trains with RandomResizedCrop: no finite set of views.
    cfg = load_config(data=env.config(teacher={"checkpoint": str(teacher)},
                                      data={"name": "imagefolder", "root": str(tmp_path / "folder")}))
    refused = "finite set of views.*RandomResizedCrop.*not to continuous augmentations: remove teacher.cache"
    with pytest.raises(DataError, match=refused):
        build_cache(cfg, tmp_path / "c", device=CPU, progress=False)
    # AutoAugment on top of crop + flip: refused when building and when training from a cache.
    cfg = load_config(data=env.config(data={"augment": "autoaugment"}))
    with pytest.raises(DataError, match="AutoAugment.*not to continuous augmentations"):
        build_cache(cfg, tmp_path / "c", device=CPU, progress=False)
    with pytest.raises(DataError, match="AutoAugment.*remove teacher.cache"):
        Trainer(cfg).setup()


def test_describe_transform_refuses_autoaugment_and_accepts_crop_flip():
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]
    spec = describe_transform(T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + tail), 32)
    assert (spec.padding, spec.flip, spec.num_views) == (4, True, 162)
    assert describe_transform(T.Compose(tail), 32).num_views == 1
    for bad in ([T.RandomCrop(32, padding=4), T.AutoAugment()] + tail,
                [T.RandomCrop(32, padding=4, padding_mode="reflect")] + tail,
                [T.RandomHorizontalFlip(0.3)] + tail):
        with pytest.raises(UnsupportedAugmentation):
            describe_transform(T.Compose(bad), 32)


def test_feature_methods_and_teacherless_methods_are_refused():
    def fake(name):
        cls = method_class(name)
        return SimpleNamespace(cfg=SimpleNamespace(name=name), requires_teacher=cls.requires_teacher,
                               needs_teacher_features=cls.needs_teacher_features)

    check_method(fake("kd"))
    check_method(fake("dkd"))
    with pytest.raises(ConfigError, match="needs the teacher's features"):
        check_method(fake("reviewkd"))
    with pytest.raises(ConfigError, match="uses no teacher"):
        check_method(fake("vanilla"))


def test_trainer_refuses_cache_for_a_teacherless_method(env):
    cfg = load_config(data=env.config(method={"name": "vanilla"}))
    with pytest.raises(ConfigError, match="uses no teacher; remove teacher.cache"):
        Trainer(cfg).setup()


def test_a_transform_whose_draws_cannot_be_replayed_is_refused(env, monkeypatch):
    import kdlab.engine.teacher_cache.feed as tc

    real = tc.view_of
    monkeypatch.setattr(tc, "view_of", lambda spec, *a, **k: (real(spec, *a, **k) + 1) % spec.num_views)
    cfg = load_config(data=env.config())
    with pytest.raises(KDLabError, match="could not be replayed.*data.pipeline=gpu"):
        Trainer(cfg).setup()


def test_images_larger_than_the_crop_are_refused(env, tmp_path):
    # RandomCrop(32, padding=4) of 40x40 images has 17 x 17 offsets, not the 9 x 9 cached; the
    # ImageFolder itself refuses them first (the cifar transform takes images of data.image_size).
    write_imagefolder(tmp_path / "big", 2, 2, size=40)
    teacher = write_teacher(tmp_path / "t2.pt", env.tiny, num_classes=2)
    cfg = load_config(data=env.config(teacher={"checkpoint": str(teacher)}, data={
        "name": "imagefolder", "root": str(tmp_path / "big"), "transform": "cifar"}))
    with pytest.raises(DataError, match=r"image_size=32 .* is 40x40"):
        build_cache(cfg, tmp_path / "c", device=CPU, progress=False)


def test_feed_replays_the_drawn_views_of_a_subset(env):
    # The trainer's API: training-set indices (here of an 8-image subset, so rows go through
    # the subset -> base map) and views=None, replayed from (seed, epoch, index).
    cfg = load_config(data=env.config(data={"train_subset": 8}))
    data = build_datasets(cfg.data, cfg.train.seed)
    spec = train_spec(data)
    _, index_map = base_of(data.train)
    assert index_map is not None and not np.array_equal(index_map, np.arange(len(index_map)))
    feed = TeacherFeed(open_cache(cfg, data, spec), spec, cfg.train.seed, index_map, CPU)
    teacher = build_teacher(cfg, CLASSES).eval()
    seeded = SeededDataset(data.train, cfg.train.seed)
    idx = torch.tensor([5, 0, 7, 2])
    epoch = 3
    images = torch.stack([seeded[(epoch, int(i))][0] for i in idx])  # what the standard pipeline drew
    with torch.no_grad():
        online = teacher(images)
    replayed = feed.logits(idx, None, epoch)
    tol = 2e-3 * float(online.abs().max())
    assert replayed.dtype == torch.float32 and torch.allclose(replayed, online, rtol=0, atol=tol)
    views = views_of(spec, cfg.train.seed, epoch, idx)
    assert torch.equal(feed.logits(idx, views, epoch), replayed)  # given views (GPU pipeline) = replayed
    other = feed.logits(idx, (views + 1) % VIEWS, epoch)
    assert not torch.allclose(other, online, rtol=0, atol=tol)  # the views passed are the ones looked up
    unmapped = TeacherFeed(open_cache(cfg, data, spec), spec, cfg.train.seed, None, CPU).logits(idx, views, epoch)
    assert not torch.allclose(unmapped, online, rtol=0, atol=tol)  # base rows differ from the subset's


def test_the_cache_package_does_not_import_the_trainer():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, kdlab.engine.teacher_cache; "
            "bad = [m for m in sys.modules if m == 'kdlab.engine.trainer' or m.startswith('kdlab.commands')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=Path(__file__).resolve().parents[1])
