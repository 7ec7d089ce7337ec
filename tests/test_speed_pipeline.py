"""The GPU-resident pipeline (on CPU, and on CUDA where present) against the standard torchvision pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from kdlab.config import load_config
from kdlab.schema.experiment import DataConfig
from kdlab.data import build_datasets
from kdlab.data.gpu_pipeline import gpu_loaders
from kdlab.data.views import ViewSpec, crop_flip, describe_transform, epoch_views, render, view_of, views_of
from kdlab.data.sampling import EpochSampler, SeededDataset
from kdlab.engine.trainer import Trainer
from kdlab.errors import DataError

try:
    from tests.fakedata import write_cifar10, write_cifar100, write_imagefolder
    from tests.speedkit import tiny_model_registered
except ImportError:  # tests/ itself on sys.path
    from fakedata import write_cifar10, write_cifar100, write_imagefolder  # type: ignore[no-redef]
    from speedkit import tiny_model_registered  # type: ignore[no-redef]

SPEC = ViewSpec(32, 4, True, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root, 40, 10)
    return root


def torchvision_view(pixels: np.ndarray, view: int, spec: ViewSpec) -> torch.Tensor:
    """The standard pipeline's image for a fixed view, with torchvision's own functional ops."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    dy, dx, flip = (int(t) for t in spec.decode(torch.tensor(view)))
    img = TF.crop(TF.pad(Image.fromarray(pixels), spec.padding, fill=0), dy, dx, spec.size, spec.size)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), spec.mean, spec.std)


def test_view_ids_round_trip():
    v = torch.arange(SPEC.num_views)
    dy, dx, flip = SPEC.decode(v)
    assert SPEC.num_views == 162
    assert torch.equal(SPEC.encode(dy, dx, flip), v)
    assert (dy.max(), dx.max(), flip.max()) == (8, 8, 1)


def test_every_view_equals_torchvision_bit_for_bit():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    views = torch.arange(SPEC.num_views)
    ours = render(torch.from_numpy(pixels)[None].expand(SPEC.num_views, -1, -1, -1), views, SPEC)
    for v in range(SPEC.num_views):
        assert torch.equal(ours[v], torchvision_view(pixels, v, SPEC)), v


def test_replayed_views_are_the_ones_the_standard_pipeline_drew(cifar):
    data = build_datasets(DataConfig(name="cifar10", root=str(cifar)), 0)
    spec = describe_transform(data.train.transform, 32)
    seeded = SeededDataset(data.train, seed=7)
    for epoch in (1, 5):
        for i in range(0, 40, 3):
            image = seeded[(epoch, i)][0]
            assert torch.equal(image, torchvision_view(data.train.data[i], view_of(spec, 7, epoch, i), spec))


def test_view_distribution_matches_the_standard_pipeline():
    n, epochs = 1000, 20
    gpu = torch.cat([epoch_views(SPEC, 0, e, n) for e in range(1, epochs + 1)])
    std = torch.cat([views_of(SPEC, 0, e, range(n)) for e in range(1, epochs + 1)])
    counts = np.stack([np.bincount(x.numpy(), minlength=SPEC.num_views) for x in (gpu, std)])
    for c in counts:  # each uniform over the 162 views
        assert chisquare(c).pvalue > 1e-3
    assert chi2_contingency(counts).pvalue > 1e-3  # and the same distribution
    _, _, flip = SPEC.decode(gpu)
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    # The test has power: a pipeline that never flipped would fail it.
    biased = np.bincount((gpu - gpu % 2).numpy(), minlength=SPEC.num_views)
    assert chi2_contingency(np.stack([biased, counts[1]])).pvalue < 1e-6


def test_epoch_views_depend_on_seed_and_epoch_only():
    assert torch.equal(epoch_views(SPEC, 3, 2, 50), epoch_views(SPEC, 3, 2, 50))
    assert not torch.equal(epoch_views(SPEC, 3, 2, 50), epoch_views(SPEC, 3, 3, 50))


def test_gpu_batches_equal_the_standard_transform_for_their_views(cifar, device):
    # On CUDA too: the batched crop/flip/normalise must give torchvision's CPU pixels bit for bit.
    cfg = DataConfig(name="cifar10", root=str(cifar), batch_size=16)
    data = build_datasets(cfg, 0)
    train, val = gpu_loaders(data, cfg, seed=3, device=torch.device(device), channels_last=True)
    train.sampler.set_epoch(2)
    batches = list(train)
    assert len(batches) == len(train) == 3
    sampler = EpochSampler(data.train, seed=3)
    sampler.set_epoch(2)
    expected_order = [i for _, i in sampler]
    got_order = torch.cat([b[2] for b in batches]).tolist()
    assert got_order == expected_order  # the standard pipeline's batch composition
    spec = describe_transform(data.train.transform, 32)
    for images, targets, idx, views in batches:
        assert images.is_contiguous(memory_format=torch.channels_last) and images.device.type == device
        for k in range(len(idx)):
            i = int(idx[k])
            assert int(targets[k]) == data.train.targets[i]
            assert torch.equal(images[k].cpu(), torchvision_view(data.train.data[i], int(views[k]), spec))
    vimages, vtargets = next(iter(val))
    assert torch.equal(vimages[0].cpu(), data.val[0][0]) and int(vtargets[0]) == data.val[0][1]


def test_gpu_loaders_shard_training_and_validation_per_rank(cifar):
    cfg = DataConfig(name="cifar10", root=str(cifar), batch_size=8)
    data = build_datasets(cfg, 0)
    shards = [gpu_loaders(data, cfg, seed=1, device=torch.device("cpu"), num_replicas=2, rank=r) for r in (0, 1)]
    seen = []
    for train, _ in shards:
        train.sampler.set_epoch(3)
        seen += torch.cat([b[2] for b in train]).tolist()
    assert sorted(seen) == list(range(40))  # the two ranks split the epoch
    vals = [torch.cat([b[1] for b in val]) for _, val in shards]
    assert sum(len(v) for v in vals) == len(data.val) == 10
    assert torch.equal(next(iter(shards[1][1]))[0][0], data.val[1][0])  # rank 1: images 1, 3, 5, ...


def test_gpu_loader_resumes_mid_epoch_with_the_same_batches(cifar, device):
    cfg = DataConfig(name="cifar10", root=str(cifar), batch_size=8)
    train, _ = gpu_loaders(build_datasets(cfg, 0), cfg, seed=1, device=torch.device(device))
    train.sampler.set_epoch(4)
    full = list(train)
    train.sampler.set_epoch(4, start=16)
    resumed = list(train)
    assert len(resumed) == len(train) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gpu_loader_serves_the_subset_with_its_noisy_labels(tmp_path):
    write_cifar100(tmp_path, 120, 20)
    cfg = DataConfig(name="cifar100", root=str(tmp_path), batch_size=50, train_subset=50, label_noise=0.5)
    data = build_datasets(cfg, 0)
    train, _ = gpu_loaders(data, cfg, seed=0, device=torch.device("cpu"))
    images, targets, idx, views = next(iter(train))
    spec = describe_transform(data.train.dataset.transform, 32)
    for k in range(len(idx)):
        i = int(idx[k])
        assert int(targets[k]) == data.train.targets[i]  # the noisy label the standard pipeline serves
        base = data.train.indices[i]
        assert torch.equal(images[k], torchvision_view(data.train.dataset.data[base], int(views[k]), spec))


def test_gpu_loader_decodes_an_imagefolder_subset_like_the_standard_pipeline(tmp_path):
    write_imagefolder(tmp_path, 3, 4, size=32, ext="mixed")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), transform="cifar", train_subset=7, batch_size=7)
    data = build_datasets(cfg, 0)
    train, val = gpu_loaders(data, cfg, seed=0, device=torch.device("cpu"))
    images, targets, idx, views = next(iter(train))
    folder = data.train.dataset
    spec = describe_transform(folder.transform, 32)
    for k in range(len(idx)):
        path, label = folder.samples[data.train.indices[int(idx[k])]]
        pixels = np.asarray(folder.loader(path))  # what ImageFolder hands its transform
        assert int(targets[k]) == label
        assert torch.equal(images[k], torchvision_view(pixels, int(views[k]), spec))
    assert len(val.targets) == 3 * 4


def test_gpu_pipeline_refuses_what_it_cannot_do(make_config):
    with pytest.raises(DataError, match="data.pipeline=standard"):
        Trainer(load_config(data=make_config(data={"pipeline": "gpu"}))).setup()  # digits tensors


def test_crop_flip_is_a_pure_gather():
    images = torch.arange(2 * 4 * 4 * 1, dtype=torch.uint8).view(2, 4, 4, 1)
    spec = ViewSpec(4, 1, True, (0.0,), (1.0,))
    out = crop_flip(images, torch.tensor([spec.encode(0, 0, 0), spec.encode(2, 1, 1)]), spec)
    assert out[0, 0, 0, 0] == 0 and out[0, 1, 1, 0] == images[0, 0, 0, 0]  # shifted down-right by the pad
    assert torch.equal(out[1, :2, :, 0], images[1, 1:3, :, 0].flip(-1))  # rows 1-2, mirrored


def test_trainer_runs_the_gpu_pipeline(make_config, cifar, device):
    with tiny_model_registered() as tiny:
        cfg = load_config(data=make_config(model={"name": tiny}, train={"device": device}, data={
            "name": "cifar10", "root": str(cifar), "pipeline": "gpu", "train_subset": None, "batch_size": 16}))
        result = Trainer(cfg).fit()
    row = result.history[0]
    assert np.isfinite(row["train/loss"]) and 0 <= row["val/top1"] <= 100
