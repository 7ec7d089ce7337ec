"""Tests of the data layer on small fake datasets written in the official formats."""
from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.schema.experiment import DataConfig
from kdlab.data import (
    DataBundle,
    RelabeledSubset,
    build_datasets,
    list_datasets,
    symmetric_label_noise,
    train_transform,
)
from kdlab.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from kdlab.errors import DataError, KDLabError

try:
    from tests.fakedata import (
        CIFAR10_CLASSES,
        CIFAR100_COARSE,
        CIFAR100_COARSE_OF,
        CIFAR100_FINE,
        pickle_bytes,
        write_cifar10,
        write_cifar100,
        write_imagefolder,
    )
except ImportError:  # tests/ itself on sys.path
    from fakedata import (  # type: ignore[no-redef]
        CIFAR10_CLASSES,
        CIFAR100_COARSE,
        CIFAR100_COARSE_OF,
        CIFAR100_FINE,
        pickle_bytes,
        write_cifar10,
        write_cifar100,
        write_imagefolder,
    )


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def stack(ds, n: int | None = None) -> torch.Tensor:
    n = len(ds) if n is None else n
    return torch.stack([ds[i][0] for i in range(n)])


def read_labels(path: Path, key: str) -> list[int]:
    with open(path, "rb") as fh:
        return list(pickle.load(fh, encoding="latin1")[key])


def assert_items(bundle: DataBundle, shape: tuple[int, int, int]) -> None:
    for ds in (bundle.train, bundle.val):
        x, y = ds[0]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert tuple(x.shape) == shape == bundle.input_size
        assert isinstance(y, int) and 0 <= y < bundle.num_classes
        assert all(isinstance(t, int) for t in ds.targets)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root, n_train=60, n_test=20)
    return root


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c100")
    write_cifar100(root, n_train=200, n_test=100)
    return root


# ----------------------------------------------------------------------------- registry


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "coco", "digits", "imagefolder", "shapes"]


def test_unknown_dataset_suggests_closest():
    from kdlab.config import load_config
    from kdlab.schema.experiment import DataConfig
    from kdlab.errors import ConfigError

    # The config layer refuses the name when the config is loaded ...
    with pytest.raises(ConfigError, match=r"data\.name: unknown dataset 'cifar1O'\. Did you mean 'cifar10'"):
        load_config(data={"model": {"name": "resnet8"}, "data": {"name": "cifar1O"}})
    # ... and build_datasets refuses it too for configs built without validation.
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig.model_construct(**{**DataConfig().model_dump(), "name": "cifar1O"}))
    msg = str(err.value)
    assert "'cifar10'" in msg and "digits" in msg and "imagefolder" in msg and "data.name" in msg
    assert isinstance(err.value, KDLabError)


def test_unknown_augment_lists_valid_ones():
    with pytest.raises(DataError, match=r"(?s)'standrad'.*standard.*none.*data\.augment"):
        build_datasets(cfg(augment="standrad"))
    with pytest.raises(DataError, match="none, standard"):
        train_transform("cifar", "nope", CIFAR10_MEAN, CIFAR10_STD)


def test_unknown_transform_preset():
    with pytest.raises(DataError, match="data.transform 'imagenet'.*digits"):
        build_datasets(cfg(transform="imagenet"))
    with pytest.raises(DataError, match="data.transform 'digits'.*'cifar10'"):
        build_datasets(cfg(name="cifar10", root="/nonexistent", transform="digits"))


# ----------------------------------------------------------------------------- digits


def test_digits_bundle():
    b = build_datasets(cfg(augment="none"))
    assert (len(b.train), len(b.val)) == (1438, 359)
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert b.coarse_of is None and b.coarse_names is None
    assert b.train_targets == b.train.targets
    assert_items(b, (3, 16, 16))
    # Stratified: each class is split 80/20.
    tr, va = Counter(b.train.targets), Counter(b.val.targets)
    for c in range(10):
        assert abs(va[c] / (tr[c] + va[c]) - 0.2) < 0.01
    # Normalised with the train statistics; the three channels are copies.
    x = stack(b.train)
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-2
    assert torch.equal(x[:, 0], x[:, 2])
    assert len(b.mean) == len(b.std) == 3


def test_digits_split_is_deterministic():
    a = build_datasets(cfg(augment="none"), seed=0)
    b = build_datasets(cfg(augment="none"), seed=123)
    assert a.train.targets == b.train.targets and a.val.targets == b.val.targets
    assert torch.equal(stack(a.val, 50), stack(b.val, 50))


def test_digits_augmentation_train_only():
    b = build_datasets(cfg())
    torch.manual_seed(0)
    draws = torch.stack([b.train[3][0] for _ in range(20)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(b.val[3][0], b.val[3][0])
    # A crop with padding keeps the size; no flips means shifted copies only.
    assert draws.shape[1:] == (3, 16, 16)
    plain = build_datasets(cfg(augment="none"))
    assert torch.equal(plain.train[3][0], plain.train[3][0])


def test_digits_cifar_size_and_loader():
    b = build_datasets(cfg(transform="cifar"))
    assert_items(b, (3, 32, 32))
    loader = torch.utils.data.DataLoader(b.train, batch_size=16, shuffle=True, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_folder(cifar10_dir):
    b = build_datasets(cfg(name="cifar10", root=str(cifar10_dir), augment="none"))
    assert (len(b.train), len(b.val), b.num_classes) == (60, 20, 10)
    assert b.class_names == CIFAR10_CLASSES
    assert b.mean == CIFAR10_MEAN and b.std == CIFAR10_STD
    assert_items(b, (3, 32, 32))
    folder = cifar10_dir / "cifar-10-batches-py"
    labels = sum((read_labels(folder / f"data_batch_{i}", "labels") for i in range(1, 6)), [])
    assert b.train.targets == labels == b.train_targets
    assert b.val.targets == read_labels(folder / "test_batch", "labels")
    assert [b.val[i][1] for i in range(len(b.val))] == b.val.targets
    # Pixels round-trip: un-normalised eval tensor == stored bytes (row layout R, G, B).
    with open(folder / "test_batch", "rb") as fh:
        rows = pickle.load(fh, encoding="latin1")["data"]
    x = b.val[0][0] * torch.tensor(CIFAR10_STD).view(3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    assert torch.allclose(x * 255, torch.from_numpy(rows[0].reshape(3, 32, 32)).float(), atol=1e-3)
    # Fake data has roughly the real per-channel statistics.
    xs = stack(b.train)
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert (xs.std(dim=(0, 2, 3)) - 1).abs().max() < 0.25


def test_cifar10_root_is_the_extracted_folder(cifar10_dir):
    b = build_datasets(cfg(name="cifar10", root=str(cifar10_dir / "cifar-10-batches-py")))
    assert len(b.train) == 60


def test_cifar10_augmentation_train_only(cifar10_dir):
    b = build_datasets(cfg(name="cifar10", root=str(cifar10_dir)))
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(10)]
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(b.val[0][0], b.val[0][0])


def test_cifar10_imagenet_preset(cifar10_dir):
    b = build_datasets(cfg(name="cifar10", root=str(cifar10_dir), transform="imagenet"))
    assert_items(b, (3, 224, 224))
    assert b.mean == CIFAR10_MEAN


def test_cifar10_tar_gz_is_extracted_once(tmp_path):
    archive = write_cifar10(tmp_path, n_train=10, n_test=5, archive=True)
    assert archive.name == "cifar-10-python.tar.gz"
    assert not (tmp_path / "cifar-10-batches-py").exists()
    b = build_datasets(cfg(name="cifar10", root=str(tmp_path)))
    folder = tmp_path / "cifar-10-batches-py"
    assert folder.is_dir() and len(b.train) == 10 and len(b.val) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    stamp = os.stat(folder / "test_batch").st_mtime_ns
    os.utime(archive, None)
    b2 = build_datasets(cfg(name="cifar10", root=str(archive)))  # root may be the archive
    assert os.stat(folder / "test_batch").st_mtime_ns == stamp
    assert b2.train.targets == b.train.targets


def test_cifar100_labels_and_coarse(cifar100_dir):
    b = build_datasets(cfg(name="cifar100", root=str(cifar100_dir), augment="none"))
    assert (len(b.train), len(b.val), b.num_classes) == (200, 100, 100)
    assert b.class_names == CIFAR100_FINE
    assert b.mean == CIFAR100_MEAN and b.std == CIFAR100_STD
    assert_items(b, (3, 32, 32))
    folder = cifar100_dir / "cifar-100-python"
    assert b.train.targets == read_labels(folder / "train", "fine_labels")
    assert b.val.targets == read_labels(folder / "test", "fine_labels")
    assert b.coarse_of == CIFAR100_COARSE_OF
    assert b.coarse_names == CIFAR100_COARSE
    assert b.train.coarse_targets == read_labels(folder / "train", "coarse_labels")
    assert [b.coarse_of[t] for t in b.val.targets] == b.val.coarse_targets


def test_cifar100_tar_gz(tmp_path):
    write_cifar100(tmp_path, n_train=100, n_test=10, archive=True)
    b = build_datasets(cfg(name="cifar100", root=str(tmp_path)))
    assert len(b.train) == 100 and b.coarse_of == CIFAR100_COARSE_OF


def test_cifar_root_not_set():
    with pytest.raises(DataError, match="data.root is not set.*cifar-10-batches-py"):
        build_datasets(cfg(name="cifar10"))


def test_cifar_root_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        build_datasets(cfg(name="cifar100", root=str(missing)))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_cifar_not_found_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as err:
        build_datasets(cfg(name="cifar10", root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert "download" in msg


def test_cifar_missing_file(tmp_path):
    folder = write_cifar10(tmp_path, n_train=10, n_test=5)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        build_datasets(cfg(name="cifar10", root=str(tmp_path)))
    assert "data_batch_3" in str(err.value) and str(folder) in str(err.value)


def test_cifar_corrupt_archive(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DataError) as err:
        build_datasets(cfg(name="cifar100", root=str(tmp_path)))
    assert str(tmp_path / "cifar-100-python.tar.gz") in str(err.value)
    assert not (tmp_path / "cifar-100-python").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-100-python.tar.gz"]


def test_cifar_corrupt_or_malicious_pickle(tmp_path):
    folder = write_cifar10(tmp_path, n_train=10, n_test=5)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch.*not a readable CIFAR-10"):
        build_datasets(cfg(name="cifar10", root=str(tmp_path)))
    # A pickle that would call os.system is refused, not executed.
    (folder / "test_batch").write_bytes(pickle_bytes(_Evil()))
    with pytest.raises(DataError, match="not allowed"):
        build_datasets(cfg(name="cifar10", root=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_imagenet_preset(tmp_path):
    write_imagefolder(tmp_path, ["cat", "dog", "eel"], n_per_class=2, size=(48, 40), ext="mixed")
    b = build_datasets(cfg(name="imagefolder", root=str(tmp_path)))
    assert b.num_classes == 3 and b.class_names == ["cat", "dog", "eel"]
    assert (len(b.train), len(b.val)) == (6, 6)
    assert b.mean == (0.485, 0.456, 0.406)
    assert_items(b, (3, 224, 224))
    assert b.train_targets == b.train.targets == [0, 0, 1, 1, 2, 2]
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(5)]
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(b.val[0][0], b.val[0][0])


def test_imagefolder_cifar_preset_and_test_split(tmp_path):
    write_imagefolder(tmp_path, 4, n_per_class=3, size=32, splits=("train", "test"), ext="jpg")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    b = build_datasets(cfg(name="imagefolder", root=str(tmp_path), transform="cifar", augment="none"))
    assert b.mean == CIFAR10_MEAN and b.std == CIFAR10_STD
    assert_items(b, (3, 32, 32))
    assert len(b.val) == 12 and b.class_names == [f"class_{i}" for i in range(4)]
    assert torch.equal(b.train[0][0], b.train[0][0])  # augment: none


def test_imagefolder_explicit_splits(tmp_path):
    write_imagefolder(tmp_path, 2, n_per_class=1, size=32, splits=("tr", "holdout"))
    b = build_datasets(
        cfg(name="imagefolder", root=str(tmp_path), train_split="tr", val_split="holdout",
            transform="cifar")
    )
    assert (len(b.train), len(b.val)) == (2, 2)


def test_imagefolder_errors(tmp_path):
    def fails(root: Path, *needles: str, **kw) -> None:
        with pytest.raises(DataError) as err:
            build_datasets(cfg(name="imagefolder", root=str(root), transform="cifar", **kw))
        for needle in needles:
            assert needle in str(err.value), str(err.value)

    fails(tmp_path / "absent", str(tmp_path / "absent"), "does not exist", "<class>")
    root = tmp_path / "ds"
    (root / "val" / "a").mkdir(parents=True)
    fails(root, str(root / "train"), "does not exist", "<class>")
    (root / "train").mkdir()
    fails(root, str(root / "train"), "no class folders")
    write_imagefolder(root, ["a"], n_per_class=1, size=32, splits=("train",))
    (root / "train" / "b").mkdir()
    fails(root, str(root / "train" / "b"), "without images")
    write_imagefolder(root, ["b"], n_per_class=1, size=32, splits=("train",))
    fails(root, str(root / "val"), "without images")
    write_imagefolder(root, ["a", "c"], n_per_class=1, size=32, splits=("val",))
    fails(root, str(root / "train"), str(root / "val"), "only in train: ['b']", "only in val: ['c']")
    fails(root, str(root / "other"), "does not exist", val_split="other")
    solo = tmp_path / "solo"
    write_imagefolder(solo, 2, n_per_class=1, size=32, splits=("train",))
    fails(solo, str(solo / "val"), str(solo / "test"), "data.val_split")


# ----------------------------------------------------------------------------- subset, noise


def test_train_subset():
    a = build_datasets(cfg(train_subset=100, augment="none"), seed=1)
    b = build_datasets(cfg(train_subset=100, augment="none"), seed=1)
    c = build_datasets(cfg(train_subset=100, augment="none"), seed=2)
    full = build_datasets(cfg(augment="none"))
    assert isinstance(a.train, RelabeledSubset)
    assert len(a.train) == 100 == len(a.train_targets) and len(a.val) == len(full.val)
    assert a.train.indices == b.train.indices != c.train.indices
    assert len(set(a.train.indices)) == 100
    i = a.train.indices[7]
    assert a.train[7][1] == full.train.targets[i] == a.train.targets[7]
    assert torch.equal(a.train[7][0], full.train[i][0])
    with pytest.raises(DataError, match="train_subset=5000.*1438"):
        build_datasets(cfg(train_subset=5000))


def test_symmetric_label_noise_statistics():
    targets = [i % 10 for i in range(20000)]
    noisy, flipped = symmetric_label_noise(targets, 10, 0.4, seed=3)
    assert abs(np.mean(flipped) - 0.4) < 0.02
    assert all((n != t) == f for n, t, f in zip(noisy, targets, flipped))
    # The new class is uniform among the 9 others.
    counts = Counter((n - t) % 10 for n, t, f in zip(noisy, targets, flipped) if f)
    assert set(counts) == set(range(1, 10))
    assert max(counts.values()) / min(counts.values()) < 1.25
    assert symmetric_label_noise(targets, 10, 0.4, seed=3) == (noisy, flipped)
    assert symmetric_label_noise(targets, 10, 0.4, seed=4)[0] != noisy
    assert symmetric_label_noise(targets, 10, 0.0, seed=3) == (targets, [False] * len(targets))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), max_size=60))
    ),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_symmetric_label_noise_property(kt, ratio, seed):
    k, targets = kt
    noisy, flipped = symmetric_label_noise(targets, k, ratio, seed)
    assert len(noisy) == len(flipped) == len(targets)
    for n, t, f in zip(noisy, targets, flipped):
        assert 0 <= n < k and (n != t) == f
    if ratio == 1.0:
        assert all(flipped)


def test_label_noise_in_bundle():
    clean = build_datasets(cfg(augment="none"))
    b = build_datasets(cfg(augment="none", label_noise=0.3, noise_seed=5))
    again = build_datasets(cfg(augment="none", label_noise=0.3, noise_seed=5))
    other = build_datasets(cfg(augment="none", label_noise=0.3, noise_seed=6))
    assert b.train_targets == b.train.targets == again.train_targets != other.train_targets
    assert b.train.clean_targets == clean.train.targets
    assert abs(np.mean(b.train.flipped) - 0.3) < 0.05
    assert all((n != t) == f for n, t, f in zip(b.train_targets, clean.train.targets, b.train.flipped))
    assert [b.train[i][1] for i in range(50)] == b.train_targets[:50]
    assert b.val.targets == clean.val.targets  # the val set is never corrupted


def test_label_noise_on_subset(cifar10_dir):
    b = build_datasets(
        cfg(name="cifar10", root=str(cifar10_dir), train_subset=40, label_noise=1.0), seed=0
    )
    assert len(b.train) == 40
    clean = [b.train.dataset.targets[i] for i in b.train.indices]
    assert all(n != t for n, t in zip(b.train_targets, clean))


def test_cifar_archive_with_unsafe_member_is_refused(tmp_path):
    import io
    import tarfile

    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="cannot extract"):
        build_datasets(cfg(name="cifar10", root=str(data)))
    assert not (tmp_path / "escaped").exists()


def test_auto_loader_workers_are_none_on_the_cpu_and_a_share_of_the_cores_on_a_gpu(monkeypatch):
    from kdlab.data.loading import MAX_AUTO_WORKERS, resolve_workers
    from kdlab.engine.build import train_loader

    assert DataConfig().num_workers == "auto"
    assert resolve_workers(3, "cpu") == 3  # an explicit count is kept
    assert resolve_workers("auto", "cpu") == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto", "cuda") == MAX_AUTO_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 16 cores
    assert resolve_workers("auto", "cuda") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert resolve_workers("auto", "cuda") == 1
    # The loaders the engine builds use it.
    loader = train_loader(list(range(8)), DataConfig(batch_size=4), seed=0, device_type="cpu")
    assert loader.num_workers == 0 and not loader.persistent_workers
    from kdlab.data.loading import loader_options

    assert loader_options(DataConfig(num_workers=2), "cuda") == {"num_workers": 2, "pin_memory": True,
                                                                  "persistent_workers": True}
    assert loader_options(DataConfig(num_workers=2), "cpu")["pin_memory"] is False
