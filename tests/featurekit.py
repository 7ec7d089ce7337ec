"""The test kit of the feature baselines of issue 24 (AT, NST, PKT, SP, OFD, RKD, CC, VID, KDSVD,
AB, FT, FSP): building a method on a CIFAR pair, training steps through the method protocol with
the teacher frozen, a bf16 step, a model without the feature contract, runs through the trainer
(one phase or two), the shipped CIFAR-100 configs and the reproduce rows. Each test file keeps
its own reference transcription and its own stage checks."""
from __future__ import annotations

import copy
import glob
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from kdlab.config import load_config
from kdlab.errors import ConfigError
from kdlab.methods import method_class
from kdlab.methods.base import Batch, Distiller, SetupContext, StepOutput
from kdlab.models import create_model
from kdlab.reproduce.table import load_rows

ROOT = Path(__file__).resolve().parents[1]

#: The three CIFAR pairs of different families every feature baseline is checked on (teacher, student).
THREE_PAIRS = [("resnet32x4", "resnet8x4"), ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2")]
#: The 13 teacher_student pairs of the CRD benchmark's CIFAR-100 table.
CRD_PAIRS = (
    "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20", "resnet110_resnet32",
    "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_MobileNetV2", "ResNet50_MobileNetV2", "ResNet50_vgg8",
    "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2", "wrn_40_2_ShuffleV1",
)
#: The students the CIFAR recipe trains at lr 0.01 (0.05 for the others).
SMALL_STUDENTS = ("ShuffleV1", "ShuffleV2", "MobileNetV2")

_MODELS: dict[str, nn.Module] = {}


def cifar_model(name: str) -> nn.Module:
    """A CIFAR-100 model built once per test process (seeded, so every test sees the same
    weights); callers get copies, never this one."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = create_model(name, 100)
    return _MODELS[name]


def cifar_models() -> dict[str, nn.Module]:
    """Copies of the models of THREE_PAIRS (100 classes, eval mode)."""
    return {n: copy.deepcopy(cifar_model(n)).eval() for n in sorted({n for pair in THREE_PAIRS for n in pair})}


def build(method: str, student: nn.Module, teacher: nn.Module, classes: int = 100, **cfg: Any) -> Distiller:
    """The method's distiller on these two modules."""
    cls = method_class(method)
    return cls(student, teacher, cls.Config(**cfg), input_size=(3, 32, 32), num_classes=classes)


def build_pair(method: str, teacher: str, student: str, classes: int = 100, **cfg: Any) -> Distiller:
    """The method's distiller for a pair of model names, with a fresh student and a fresh teacher
    (copies of the cached CIFAR-100 models; new models for another class count)."""
    t, s = ((copy.deepcopy(cifar_model(teacher)), copy.deepcopy(cifar_model(student))) if classes == 100
            else (create_model(teacher, classes), create_model(student, classes)))
    torch.manual_seed(0)
    return build(method, s, t, classes, **cfg)


def context(n: int = 32, classes: int = 100, world_size: int = 1) -> SetupContext:
    return SetupContext(train_set=range(n), num_train_samples=n, num_classes=classes,
                        data_cfg=load_config(data={"model": {"name": "resnet8"}}).data, seed=0,
                        device=torch.device("cpu"), run_dir=None, world_size=world_size)


def batch(classes: int = 100, n: int = 4, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g),
                 indices=torch.arange(n))


@torch.no_grad()
def features(d: Distiller, images: torch.Tensor):
    """(teacher Features, student Features) of `images`, as the step computes them."""
    return d.teacher(images, features=True)[1], d.student(images, features=True)[1]


def step_with_features(d: Distiller, batch_size: int = 4):
    """One training-mode step of `d`, and both networks' features of the same batch:
    (StepOutput, student Features, teacher Features)."""
    d.train()
    x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = d.forward_train(Batch(x, torch.arange(batch_size)), 1)
    tf, sf = features(d, x)
    return out, sf, tf


class Plain(nn.Module):
    """A classifier without the `features=True` contract."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def check_wrn_uses_the_raw_residual_sums(method: str, reference, stat: str, teacher: str = "wrn_16_2",
                                         last_only: bool = False, n: int = 2) -> None:
    """The references' WRN feats are the blocks' raw outputs (before the next BN-ReLU): the step's
    unweighted statistic `stat` is `reference(student map, teacher map)` summed over the distilled
    stage pairs (every stage, or the last) of those, which differs from it on the activated outputs."""
    torch.manual_seed(0)
    d = build(method, create_model("wrn_16_2", 10), create_model(teacher, 10), classes=10)
    images = torch.randn(n, 3, 32, 32)
    out = d.forward_train(Batch(images, torch.arange(1, n + 1)), 1)
    tf, sf = features(d, images)
    chosen = slice(-1, None) if last_only else slice(None)
    raw = sum(reference(s, t) for s, t in zip(sf.raw_stages[chosen], tf.raw_stages[chosen]))
    activated = sum(reference(s, t) for s, t in zip(sf.stages[chosen], tf.stages[chosen]))
    assert not torch.allclose(raw, activated)
    torch.testing.assert_close(out.stats[stat], raw)


def train_two_steps(d: Distiller, terms: set[str], classes: int = 100, batch_size: int = 4) -> list[StepOutput]:
    """Two SGD steps through the protocol as the engine takes them; checks the loss terms, that
    the teacher (weights and batch-norm statistics) stays as it was and gets no gradient, and
    that the student learns. Returns each step's StepOutput."""
    d.setup(context(classes=classes))
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    d.train()
    outputs = []
    for step in (1, 2):
        b = Batch(torch.randn(batch_size, 3, 32, 32, generator=g),
                  torch.randint(0, classes, (batch_size,), generator=g), indices=torch.arange(batch_size))
        out = d(b, step)  # through forward, as the engine (and DDP) call it
        assert set(out.losses) == terms and out.logits.shape == (batch_size, classes)
        assert all(torch.isfinite(v) for v in out.losses.values())
        opt.zero_grad()
        sum(out.losses.values()).backward()
        assert all(p.grad is None for p in d.teacher.parameters())
        opt.step()
        outputs.append(out)
    for k, v in d.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert any(not torch.equal(v, student_before[k]) for k, v in d.student.state_dict().items())
    assert not d.teacher.training
    return outputs


def check_trains_with_the_teacher_frozen(d: Distiller, term: str) -> None:
    """For a method without trainable extras: two steps as `train_two_steps` takes them, the
    method's term positive, and that term alone reaches the student; nothing to checkpoint."""
    assert d.needs_teacher_features and d.requires_teacher and not d.needs_sample_indices
    assert d.extra_state_dict() == {}
    out = train_two_steps(d, {"ce", term}, classes=10)[0]
    assert out.losses[term].item() > 0
    d.zero_grad(set_to_none=True)
    d(batch(classes=10), 1).losses[term].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


def check_refuses_a_model_without_features(method: str) -> None:
    """One ConfigError naming the method and the pair, for a teacher or a student without
    stage features."""
    cls = method_class(method)
    with pytest.raises(ConfigError, match=rf"method {method} cannot distil CifarResNet -> Plain: .*features=True"):
        cls(Plain(), create_model("resnet8", 10), cls.Config())
    with pytest.raises(ConfigError, match=rf"method {method} cannot distil Plain -> CifarResNet: .*features=True"):
        cls(create_model("resnet8", 10), Plain(), cls.Config())


def check_bf16_step_is_finite(method: str, epochs: tuple[int, ...] = (1,), **cfg: Any) -> None:
    """A bf16-autocast step (at each of `epochs`) gives finite float32 loss terms."""
    d = build_pair(method, "resnet8", "resnet8", classes=10, **cfg)
    d.train()
    for epoch in epochs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = d.forward_train(batch(classes=10), epoch)
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


def train_teacher_then(method: dict, make_config, tmp_path: Path, **overrides: Any) -> tuple[list[dict], Path]:
    """`kdlab train`'s Trainer: a resnet8 teacher for the default epochs, then `method` (a config
    `method` section) on it; returns the student run's metrics rows and its folder."""
    from kdlab.engine.trainer import Trainer  # lazy: only the end-to-end tests run the engine

    Trainer(load_config(data=make_config(name="teacher"))).fit()
    teacher = {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "teacher" / "last.pt")}
    Trainer(load_config(data=make_config(name=method["name"], teacher=teacher, method=method, **overrides))).fit()
    run = tmp_path / "runs" / method["name"]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()], run


def check_trains_end_to_end(method: str, term: str, weight: float, make_config, tmp_path: Path) -> None:
    """`kdlab train` with the method (after a 1-epoch teacher): the weighted term and its
    unweighted statistic are logged, and the run saves no method state."""
    from kdlab.engine.checkpoint import Checkpoint  # lazy: only the end-to-end tests read checkpoints

    rows, run = train_teacher_then({"name": method}, make_config, tmp_path)
    assert rows[-1][f"train/{term}"] > 0
    assert rows[-1][f"train/{term}"] == pytest.approx(weight * rows[-1][f"stat/{term}_loss"], rel=1e-4)
    assert not Checkpoint.load(run / "last.pt").extra_state


def train_two_phases(make_config, tmp_path: Path, method: dict) -> tuple[list[dict], Path]:
    """A resnet8 teacher, then `method` for two epochs with init_epochs=1 through the Trainer;
    returns the student run's metrics rows and its folder."""
    return train_teacher_then({**method, "init_epochs": 1}, make_config, tmp_path,
                              train={"epochs": 2, "progress": False, "tensorboard": False, "device": "cpu"})


def assert_phases(rows: list[dict], init: set[str], main: set[str]) -> None:
    """Epoch 1 logs only the init terms (the main ones at exactly 0), epoch 2 only the main ones."""
    by_epoch = {r["epoch"]: r for r in rows}
    for epoch, active, idle in ((1, init, main), (2, main, init)):
        row = by_epoch[epoch]
        assert all(row[f"train/{k}"] > 0 for k in active), (epoch, row)
        assert all(row[f"train/{k}"] == 0.0 for k in idle), (epoch, row)
        assert row["train/loss"] == pytest.approx(sum(row[f"train/{k}"] for k in active))


def cifar_configs(method: str, pairs, init_epochs: int = 0) -> Iterator:
    """Every configs/cifar100/<method>/*.yaml, loaded, after the checks all baseline configs
    share: one per pair of `pairs`, the naming, the teacher's last.pt and config, and the CRD
    benchmark's recipe (240 epochs, decays at 150/180/210; `init_epochs` more before them)."""
    paths = sorted(glob.glob(str(ROOT / "configs" / "cifar100" / method / "*.yaml")))
    assert {Path(p).stem for p in paths} == set(pairs)
    for path in paths:
        cfg = load_config(path)
        assert cfg.method.name == method and cfg.name == f"{method}_{Path(path).stem}"
        assert f"{cfg.teacher.name}_{cfg.model.name}" == Path(path).stem
        assert cfg.teacher.checkpoint == f"runs/teacher_{cfg.teacher.name}/last.pt"
        assert (ROOT / "configs" / "cifar100" / "teachers" / f"{cfg.teacher.name}.yaml").is_file()
        assert cfg.optim.lr == (0.01 if cfg.model.name in SMALL_STUDENTS else 0.05) and cfg.data.batch_size == 64
        assert getattr(cfg.method, "init_epochs", 0) == init_epochs
        assert cfg.train.epochs == 240 + init_epochs
        assert cfg.schedule.milestones == [m + init_epochs for m in (150, 180, 210)]
        yield cfg


def check_cifar_configs(method: str, published: dict[str, float], settings: dict[str, Any]) -> None:
    """`cifar_configs` for the published pairs, each with the method's reference `settings` and
    its published number in a comment."""
    for cfg in cifar_configs(method, published):
        assert {k: getattr(cfg.method, k) for k in settings} == settings, cfg.name
        pair = cfg.name.removeprefix(f"{method}_")
        text = (ROOT / "configs" / "cifar100" / method / f"{pair}.yaml").read_text()
        assert f"published top-1 {published[pair]:.2f}" in text


def check_cifar_rows(method: str, published: dict[str, float | None], unpublished: tuple[str, ...] = ()) -> dict:
    """The `<method>/cifar100/<pair>` rows: one per `published` pair with its number (None where
    no number exists), its config and teacher, the source named in the note; one per
    `unpublished` pair (n/a in the source table) with neither. Returns all rows of the method by id."""
    rows = {r.id: r for r in load_rows() if r.method == method}
    assert {i.split("/")[-1] for i in rows if i.startswith(f"{method}/cifar100/")} == {*published, *unpublished}
    for pair, number in published.items():
        row = rows[f"{method}/cifar100/{pair}"]
        assert row.published == number and row.metric == "top1" and row.dataset == "cifar100"
        assert row.config == f"configs/cifar100/{method}/{pair}.yaml" and (ROOT / row.config).is_file()
        assert (ROOT / row.teacher_config).is_file() and "PAPERS.md section 6" in row.note
    for pair in unpublished:
        row = rows[f"{method}/cifar100/{pair}"]
        assert row.published is None and row.config is None and "n/a" in row.note
    return rows
