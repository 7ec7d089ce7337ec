"""The papers' experiment modes: AutoAugment, label noise (and its record), the sample-split
NCKD method, multi-seed runs and the results table."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml

from kdlab.methods.base import Batch, SetupContext
from kdlab.config import load_config
from kdlab.data import build_datasets
from kdlab.data.sampling import SeededDataset
from kdlab.errors import DataError, TrainingError
from kdlab.data.noise_record import LABELS_NAME, RECORD_NAME, label_hash, write_noise_record
from kdlab.experiments.results import (
    find_runs,
    format_csv,
    format_text,
    group_runs,
    mean_std,
    split_seed_name,
)
from kdlab.methods.dkd_split import DKDSplit, DKDSplitConfig, masked_mean, select_fraction, target_confidence
try:
    from tests.fakedata import write_cifar100
except ImportError:  # tests/ itself on sys.path
    from fakedata import write_cifar100  # type: ignore[no-redef]


# ----------------------------------------------------------------------------- AutoAugment
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, n_train=100, n_test=20)
    return root


def _cifar(root, augment):
    from kdlab.schema.experiment import DataConfig

    return build_datasets(DataConfig(name="cifar100", root=str(root), augment=augment, num_workers=0), seed=0)


def test_autoaugment_pipeline_order():
    from torchvision import transforms as T

    from kdlab.data.transforms import CIFAR100_MEAN, CIFAR100_STD, train_transform

    tf = train_transform("cifar", "autoaugment", CIFAR100_MEAN, CIFAR100_STD)
    kinds = [type(t).__name__ for t in tf.transforms]
    assert kinds == ["RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ToTensor", "Normalize"]
    assert tf.transforms[2].policy == T.AutoAugmentPolicy.CIFAR10


def test_autoaugment_only_in_training(cifar_root):
    std, aa = _cifar(cifar_root, "standard"), _cifar(cifar_root, "autoaugment")
    # Evaluation images are identical: AutoAugment never touches the val pipeline.
    for i in range(5):
        assert torch.equal(std.val[i][0], aa.val[i][0])
    # Training images under the same per-sample seeds: reproducible, but not the standard ones.
    s_std, s_aa, s_aa2 = SeededDataset(std.train, 0), SeededDataset(aa.train, 0), SeededDataset(aa.train, 0)
    differ = 0
    for i in range(12):
        a, b = s_aa[(1, i)][0], s_aa2[(1, i)][0]
        assert torch.equal(a, b)
        differ += not torch.equal(a, s_std[(1, i)][0])
    assert differ >= 6, "AutoAugment changed too few training images"


def test_autoaugment_refuses_digits():
    from kdlab.schema.experiment import DataConfig

    with pytest.raises(DataError, match="augment=standard"):
        build_datasets(DataConfig(name="digits", augment="autoaugment"), seed=0)


# ----------------------------------------------------------------------------- label noise
def _digits(**kw):
    from kdlab.schema.experiment import DataConfig

    return build_datasets(DataConfig(name="digits", num_workers=0, **kw), seed=0)


def test_noise_ratio_measured_and_seeded(tmp_path):
    clean = _digits()
    noisy = _digits(label_noise=0.3, noise_seed=5)
    same = _digits(label_noise=0.3, noise_seed=5)
    other = _digits(label_noise=0.3, noise_seed=6)
    y0, y1 = np.array(clean.train_targets), np.array(noisy.train_targets)
    ratio = float((y0 != y1).mean())
    assert abs(ratio - 0.3) < 0.04, ratio  # 1438 labels: binomial std ~0.012
    assert noisy.train_targets == same.train_targets
    assert noisy.train_targets != other.train_targets
    # Validation labels are never corrupted.
    assert [noisy.val[i][1] for i in range(50)] == [clean.val[i][1] for i in range(50)]

    rec = write_noise_record(tmp_path, _cfg_data(0.3, 5), noisy.train, noisy.train_targets)
    assert rec["measured_ratio"] == pytest.approx(ratio)
    assert rec["num_flipped"] == int((y0 != y1).sum())
    saved = np.load(tmp_path / LABELS_NAME)
    assert label_hash(saved) == rec["labels_sha256"] == label_hash(same.train_targets)
    assert json.loads((tmp_path / RECORD_NAME).read_text())["labels_sha256"] == rec["labels_sha256"]
    assert write_noise_record(tmp_path / "clean", _cfg_data(0.0, 0), clean.train, clean.train_targets) is None
    assert not (tmp_path / "clean").exists()


def _cfg_data(ratio, seed):
    from kdlab.schema.experiment import DataConfig

    return DataConfig(name="digits", label_noise=ratio, noise_seed=seed)


# ----------------------------------------------------------------------------- sample split
def test_select_fraction_sizes_and_sides():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6])
    top = select_fraction(scores, 0.5, "top")
    bottom = select_fraction(scores, 0.5, "bottom")
    assert int(top.sum()) == int(bottom.sum()) == 4
    assert set(top.nonzero().squeeze(1).tolist()) == {0, 3, 6, 7}
    assert torch.equal(top, ~bottom)  # even N, fraction 0.5: a partition
    assert int(select_fraction(scores[:7], 0.5, "top").sum()) == 3  # floor(0.5 * 7)
    ties = torch.zeros(6)
    assert select_fraction(ties, 0.5, "top").tolist() == [True] * 3 + [False] * 3  # stable


def _split_distiller(**cfg):
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    return DKDSplit(student, teacher, DKDSplitConfig(warmup_epochs=0, **cfg), input_size=(6,), num_classes=5)


def test_batch_split_applies_nckd_to_exactly_half():
    from kdlab.losses import dkd_terms

    d = _split_distiller(split="batch", half="top")
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    out = d(Batch(x, y), 1)
    t_logits, s_logits = d.teacher(x), d.student(x)
    mask = select_fraction(target_confidence(t_logits, y), 0.5, "top")
    assert int(mask.sum()) == 5
    parts = dkd_terms(s_logits, t_logits, y, 4.0)
    assert out.losses["nckd"].item() == pytest.approx((parts.nckd * mask).sum().item() / 10, rel=1e-5)
    assert set(out.losses) == {"ce", "nckd"}  # tckd: none by default
    assert out.stats["nckd_share"].item() == 0.5
    # The chosen half has the higher teacher confidence.
    assert out.stats["selected_conf"].item() >= out.stats["teacher_conf"].item()
    sel = _split_distiller(split="batch", normalize="selected", tckd="selected")(Batch(x, y), 1)
    assert sel.losses["nckd"].item() == pytest.approx(out.losses["nckd"].item() * 2, rel=1e-5)
    assert "tckd" in sel.losses


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.targets = x, y.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def test_global_split_ranks_the_training_set_once(tmp_path):
    from kdlab.schema.experiment import DataConfig

    d = _split_distiller(split="global", half="bottom", rank_view="augmented")
    assert d.needs_sample_indices
    x, y = torch.randn(20, 6), torch.randint(0, 5, (20,))
    data_cfg = DataConfig(name="digits", num_workers=0, batch_size=8)
    d.setup(SetupContext(train_set=_Tensors(x, y), num_train_samples=20, num_classes=5, data_cfg=data_cfg, seed=0,
                         device=torch.device("cpu"), run_dir=tmp_path))
    conf = target_confidence(d.teacher(x), y)
    assert int(d.selected.sum()) == 10
    assert conf[d.selected].max() <= conf[~d.selected].min()  # the bottom half
    record = json.loads((tmp_path / "nckd_split.json").read_text())
    assert record["num_selected"] == 10 and record["num_samples"] == 20
    # Membership follows the sample index, whatever the batch.
    idx = torch.tensor([0, 1, 2, 3])
    assert torch.equal(d.selection(d.teacher(x[idx]), y[idx], idx), d.selected[idx])
    with pytest.raises(TrainingError, match="split=batch"):
        d(Batch(x[:4], y[:4]), 1)  # no indices


def test_masked_mean_normalisation():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([True, False, True, False])
    assert masked_mean(v, m, "batch").item() == pytest.approx(1.0)
    assert masked_mean(v, m, "selected").item() == pytest.approx(2.0)
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool), "selected").item() == 0.0


# ----------------------------------------------------------------------------- end to end
def test_noisy_teacher_and_split_student_share_labels(make_config, tmp_path):
    from kdlab.engine.trainer import Trainer

    noise = {"label_noise": 0.2, "noise_seed": 3, "train_subset": 64}
    teacher = Trainer(load_config(data=make_config(name="teacher", data=noise))).fit()
    t_dir = tmp_path / "runs" / "teacher"
    student = make_config(name="student", data=noise,
                          teacher={"name": "resnet8", "checkpoint": str(t_dir / "best.pt")},
                          method={"name": "dkd_split", "half": "top", "split": "global"})
    Trainer(load_config(data=student)).fit()
    s_dir = tmp_path / "runs" / "student"
    t_rec = json.loads((t_dir / RECORD_NAME).read_text())
    s_rec = json.loads((s_dir / RECORD_NAME).read_text())
    assert t_rec["labels_sha256"] == s_rec["labels_sha256"]
    assert s_rec["teacher_same_labels"] is True
    assert label_hash(np.load(s_dir / LABELS_NAME)) == s_rec["labels_sha256"]
    assert s_rec["num_flipped"] == round(s_rec["measured_ratio"] * 64)
    split = json.loads((s_dir / "nckd_split.json").read_text())
    assert split["num_selected"] == 32
    assert len(np.load(s_dir / "nckd_split_indices.npy")) == 32
    row = json.loads((s_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["stat/nckd_share"] == pytest.approx(0.5)  # every sample once per epoch
    assert teacher.run_dir


def test_train_seeds_and_results_table(make_config, tmp_path, capsys):
    from kdlab.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(make_config(name="sweep", data={"train_subset": 64}, train={"seed": 4})))
    assert main(["-q", "train", str(cfg_path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    assert (runs / "sweep_seed4" / "result.json").is_file() and (runs / "sweep_seed5" / "result.json").is_file()
    seeds = [yaml.safe_load((runs / f"sweep_seed{k}" / "config.yaml").read_text())["train"]["seed"] for k in (4, 5)]
    assert seeds == [4, 5]
    assert "sweep" in out and " 2 " in out
    assert main(["results", str(runs), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["run"] == "sweep" and rows[0]["n"] == "2"
    lasts = [json.loads((runs / f"sweep_seed{k}" / "result.json").read_text())["last"]["top1"] for k in (4, 5)]
    assert float(rows[0]["last_top1_mean"]) == pytest.approx(sum(lasts) / 2, abs=1e-3)


# ----------------------------------------------------------------------------- summary math
def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)
    assert split_seed_name("dkd_x_seed12") == ("dkd_x", 12)
    assert split_seed_name("teacher") == ("teacher", None)


def _fake_run(folder, name, seed, last, best, method="kd", lr=0.05):
    d = folder / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"epochs": 240, "last_top1": last, "last_top5": 90.0, "best_top1": best,
                                               "best_top5": 91.0, "best_epoch": 200}))
    cfg = {"name": name, "model": {"name": "resnet8x4"}, "teacher": {"name": "resnet32x4"},
           "method": {"name": method}, "data": {"name": "cifar100"}, "optim": {"lr": lr}, "train": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_group_runs_mean_and_std(tmp_path):
    for seed, last, best in ((0, 75.0, 76.0), (1, 76.0, 76.5), (2, 77.0, 77.5)):
        _fake_run(tmp_path, f"dkd_seed{seed}", seed, last, best, "dkd")
    _fake_run(tmp_path, "kd", 0, 73.3, 73.5)
    _fake_run(tmp_path, "odd_seed0", 0, 70.0, 70.0, lr=0.05)
    _fake_run(tmp_path, "odd_seed1", 1, 71.0, 71.0, lr=0.01)
    groups = {g.group: g for g in group_runs(find_runs(tmp_path), root=tmp_path)}
    assert set(groups) == {"dkd", "kd", "odd"}
    dkd = groups["dkd"]
    assert dkd.n == 3 and dkd.stats["last_top1"] == pytest.approx((76.0, 1.0))
    assert dkd.stats["best_top1"][0] == pytest.approx(76.6667, abs=1e-3)
    assert groups["kd"].stats["last_top1"] == (73.3, 0.0)
    assert dkd.consistent and not groups["odd"].consistent
    text = format_text(list(groups.values()))
    assert "76.00 ± 1.00" in text and "configs differ" in text and "73.30 " in text
    parsed = list(csv.DictReader(io.StringIO(format_csv([dkd]))))
    assert float(parsed[0]["last_top1_std"]) == pytest.approx(1.0)


def _fake_detection_run(folder, name, seed, last_ap, best_ap):
    d = folder / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({
        "epochs": 5, "last_top1": math.nan, "best_top1": math.nan, "last_top5": math.nan, "best_top5": math.nan,
        "best_epoch": 5, "primary_metric": "bbox_ap",
        "last": {"bbox_ap": last_ap, "bbox_ap50": last_ap + 20}, "best": {"bbox_ap": best_ap, "bbox_ap50": best_ap + 20}}))
    cfg = {"name": name, "task": "detection", "model": {"name": "det:fasterrcnn_mobilenet_v2_fpn"},
           "teacher": {"name": "det:fasterrcnn_resnet18_fpn"}, "method": {"name": "det_dkd"},
           "data": {"name": "shapes"}, "train": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_detection_runs_are_tabulated_by_box_ap(tmp_path):
    """`kdlab results` of detection runs: box AP and AP50 columns (no empty top-1 ones); a folder
    holding both kinds shows both sets of columns, each run filling its own."""
    for seed, ap in ((0, 40.0), (1, 44.0)):
        _fake_detection_run(tmp_path / "det", f"shapes_dkd_seed{seed}", seed, ap, ap + 1)
    groups = group_runs(find_runs(tmp_path / "det"), root=tmp_path / "det")
    assert groups[0].stats["last_bbox_ap"] == pytest.approx((42.0, math.sqrt(8.0)))
    text = format_text(groups)
    assert "last bbox_ap" in text and "top1" not in text and "42.00 ± 2.83" in text and "62.00 ± 2.83" in text
    parsed = list(csv.DictReader(io.StringIO(format_csv(groups))))
    assert float(parsed[0]["best_bbox_ap_mean"]) == pytest.approx(43.0) and "last_top1_mean" not in parsed[0]
    _fake_run(tmp_path / "det", "kd", 0, 73.3, 73.5)
    both = format_text(group_runs(find_runs(tmp_path / "det"), root=tmp_path / "det"))
    assert "last top1" in both and "last bbox_ap" in both and "73.30" in both
