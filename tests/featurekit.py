"""Checks shared by the tests of the feature baselines without trainable extras (AT, SP, PKT,
NST): one training step through the method protocol, a bf16 step, a model without the feature
contract, the shipped CIFAR-100 configs and the reproduce rows. Each test file keeps its own
reference transcription and its own stage checks."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.trainer import Trainer
from kdlab.methods import method_class
from kdlab.methods.base import Batch, Distiller
from kdlab.models import create_model
from kdlab.reproduce.table import load_rows

ROOT = Path(__file__).resolve().parents[1]

#: The three CIFAR pairs of different families every feature baseline is checked on.
THREE_PAIRS = [("resnet32x4", "resnet8x4"), ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2")]


def cifar_models() -> dict[str, nn.Module]:
    """The models of THREE_PAIRS, built once (100 classes, eval mode)."""
    torch.manual_seed(0)
    names = {n for pair in THREE_PAIRS for n in pair}
    return {n: create_model(n, 100).eval() for n in sorted(names)}


def build(method: str, student: nn.Module, teacher: nn.Module, classes: int = 100, **cfg: Any) -> Distiller:
    cls = method_class(method)
    return cls(student, teacher, cls.Config(**cfg), input_size=(3, 32, 32), num_classes=classes)


@torch.no_grad()
def features(d: Distiller, images: torch.Tensor):
    """(teacher Features, student Features) of `images`, as the step computes them."""
    return d.teacher(images, features=True)[1], d.student(images, features=True)[1]


class Plain(nn.Module):
    """A classifier without the `features=True` contract."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def check_trains_with_the_teacher_frozen(d: Distiller, term: str) -> None:
    """One SGD step through `forward`, as the engine calls it: the method's term is positive and
    reaches the student, the teacher gets no gradient and keeps its weights, statistics and
    eval mode; the method has no extras to checkpoint."""
    assert d.needs_teacher_features and d.requires_teacher and not d.needs_sample_indices
    assert d.extra_state_dict() == {}
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    d.train()
    out = d(Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))), 1)
    assert set(out.losses) == {"ce", term} and out.logits.shape == (4, 10)
    assert out.losses[term].item() > 0
    opt.zero_grad()
    out.losses[term].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    opt.step()
    for k, v in d.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])
    assert not d.teacher.training


def check_bf16_step_is_finite(method: str) -> None:
    d = build(method, create_model("resnet8", 10), create_model("resnet8", 10), classes=10)
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d.forward_train(Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))), 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


def check_cifar_configs(method: str, published: dict[str, float], settings: dict[str, Any]) -> None:
    """Every configs/cifar100/<method>/*.yaml: one per published pair, the method's reference
    `settings`, the CRD benchmark's recipe and the teacher's last.pt."""
    paths = sorted(glob.glob(str(ROOT / "configs" / "cifar100" / method / "*.yaml")))
    assert {Path(p).stem for p in paths} == set(published)
    for path in paths:
        cfg = load_config(path)
        assert cfg.method.name == method and cfg.name == f"{method}_{Path(path).stem}"
        assert {k: getattr(cfg.method, k) for k in settings} == settings, path
        assert f"{cfg.teacher.name}_{cfg.model.name}" == Path(path).stem
        assert cfg.teacher.checkpoint == f"runs/teacher_{cfg.teacher.name}/last.pt"
        small = cfg.model.name in ("ShuffleV1", "ShuffleV2", "MobileNetV2")
        assert cfg.optim.lr == (0.01 if small else 0.05) and cfg.data.batch_size == 64
        assert cfg.train.epochs == 240 and cfg.schedule.milestones == [150, 180, 210]
        assert f"published top-1 {published[Path(path).stem]:.2f}" in Path(path).read_text()


def check_cifar_rows(method: str, published: dict[str, float]) -> dict:
    """The `<method>/cifar100/<pair>` rows carry the published numbers, their configs and
    teachers exist and the note names the source; returns all rows of the method by id."""
    rows = {r.id: r for r in load_rows() if r.method == method}
    assert {i.split("/")[-1] for i in rows if i.startswith(f"{method}/cifar100/")} == set(published)
    for pair, number in published.items():
        row = rows[f"{method}/cifar100/{pair}"]
        assert row.published == number and row.metric == "top1" and row.dataset == "cifar100"
        assert row.config == f"configs/cifar100/{method}/{pair}.yaml" and (ROOT / row.config).is_file()
        assert (ROOT / row.teacher_config).is_file() and "PAPERS.md section 6" in row.note
    return rows


def check_trains_end_to_end(method: str, term: str, weight: float, make_config, tmp_path: Path) -> None:
    """`kdlab train` with the method (after a 1-epoch teacher): the weighted term and its
    unweighted statistic are logged, and the run saves no method state."""
    Trainer(load_config(data=make_config(name="teacher"))).fit()
    teacher = {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "teacher" / "last.pt")}
    Trainer(load_config(data=make_config(name=method, teacher=teacher, method={"name": method}))).fit()
    row = json.loads((tmp_path / "runs" / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert row[f"train/{term}"] > 0
    assert row[f"train/{term}"] == pytest.approx(weight * row[f"stat/{term}_loss"], rel=1e-4)
    assert not Checkpoint.load(tmp_path / "runs" / method / "last.pt").extra_state
