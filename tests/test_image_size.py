"""`data.image_size`: the side the model sees, with the training crop and the evaluation resize
derived from it; the cifar (32) and imagenet (224) presets are its special cases."""
from __future__ import annotations

import pytest
from torchvision import transforms as T

from kdlab.config import load_config
from kdlab.schema.experiment import DataConfig
from kdlab.data import build_datasets
from kdlab.data.transforms import eval_transform, train_transform
from kdlab.errors import ConfigError, DataError

try:
    from tests.fakedata import write_cifar10, write_imagefolder
except ImportError:  # pragma: no cover - run from inside tests/
    from fakedata import write_cifar10, write_imagefolder  # type: ignore[no-redef]

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _steps(transform):
    return [(type(t).__name__, getattr(t, "size", None), getattr(t, "padding", None)) for t in transform.transforms]


def test_presets_are_the_special_cases():
    # cifar at its own 32: RandomCrop(32, padding=4) + flip; evaluation: no resizing at all.
    assert _steps(train_transform("cifar", "standard", MEAN, STD)) == _steps(
        train_transform("cifar", "standard", MEAN, STD, 32))
    assert _steps(train_transform("cifar", "standard", MEAN, STD))[0] == ("RandomCrop", (32, 32), 4)
    assert [s[0] for s in _steps(eval_transform("cifar", MEAN, STD))] == ["ToTensor", "Normalize"]
    # imagenet at its own 224: RandomResizedCrop(224); evaluation Resize(256) + CenterCrop(224).
    assert _steps(train_transform("imagenet", "standard", MEAN, STD))[0][:2] == ("RandomResizedCrop", (224, 224))
    assert _steps(eval_transform("imagenet", MEAN, STD))[:2] == [("Resize", 256, None), ("CenterCrop", (224, 224), None)]


@pytest.mark.parametrize("size, padding, resize", [(64, 8, 73), (32, 4, 37), (16, 2, 18)])
def test_crop_padding_and_eval_resize_follow_the_size(size, padding, resize):
    assert _steps(train_transform("cifar", "standard", MEAN, STD, size))[0] == ("RandomCrop", (size, size), padding)
    assert _steps(train_transform("imagenet", "standard", MEAN, STD, size))[0][:2] == (
        "RandomResizedCrop", (size, size))
    assert _steps(eval_transform("imagenet", MEAN, STD, size))[:2] == [
        ("Resize", resize, None), ("CenterCrop", (size, size), None)]
    auto = train_transform("cifar", "autoaugment", MEAN, STD, size)
    assert isinstance(auto.transforms[0], T.RandomCrop) and auto.transforms[0].padding == padding


def test_imagefolder_of_any_size_seen_at_image_size(tmp_path):
    write_imagefolder(tmp_path, 3, 2, size=(48, 40))
    data = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), transform="imagenet", image_size=32))
    assert data.input_size == (3, 32, 32)
    assert tuple(data.train[0][0].shape) == (3, 32, 32) and tuple(data.val[0][0].shape) == (3, 32, 32)


def test_imagefolder_small_images_with_the_cifar_transform(tmp_path):
    write_imagefolder(tmp_path, 2, 2, size=24)
    data = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), transform="cifar", image_size=24))
    assert data.input_size == (3, 24, 24) and tuple(data.train[0][0].shape) == (3, 24, 24)
    assert data.train.transform.transforms[0].padding == 3
    # The default side (32) does not fit 24-pixel images: one error naming the two ways on.
    with pytest.raises(DataError, match=r"image_size=32 .* is 24x24; set data\.image_size=24 .* data\.transform=imagenet"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), transform="cifar"))


def test_cifar_keeps_32_under_its_own_transform_and_resizes_under_imagenet(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5)
    with pytest.raises(DataError, match=r"image_size=64 .* 32x32 .* data\.transform=imagenet"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), image_size=64))
    assert build_datasets(DataConfig(name="cifar10", root=str(tmp_path), image_size=32)).input_size == (3, 32, 32)
    data = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), transform="imagenet", image_size=64))
    assert tuple(data.train[0][0].shape) == (3, 64, 64) and tuple(data.val[0][0].shape) == (3, 64, 64)


def test_digits_upsampled_to_image_size():
    data = build_datasets(DataConfig(name="digits", image_size=24))
    assert data.input_size == (3, 24, 24) and tuple(data.train[0][0].shape) == (3, 24, 24)


def test_image_size_is_validated(make_config):
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(data=make_config(data={"image_size": 0}))
    assert load_config(data=make_config(data={"image_size": 20})).data.image_size == 20
