"""FitNet: the hint loss against hand values and an independent computation, the regressor's
shapes for every published pair, training through the method protocol (regressor trained,
teacher frozen), the shipped configs and the reproduce rows."""
from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.config import load_config
from kdlab.errors import ConfigError
from kdlab.losses import hint_loss
from kdlab.methods import method_class
from kdlab.methods.base import Batch, SetupContext
from kdlab.methods.fitnet import ConvRegressor, FitNet, FitNetConfig
from kdlab.models import StageInfo, create_model

ROOT = Path(__file__).resolve().parents[1]

# PAPERS.md section 5: FitNet top-1 on CIFAR-100 (the CRD benchmark).
PUBLISHED = {
    "resnet56_resnet20": 69.21, "resnet110_resnet32": 71.06, "resnet32x4_resnet8x4": 73.50,
    "wrn_40_2_wrn_16_2": 73.58, "wrn_40_2_wrn_40_1": 72.24, "vgg13_vgg8": 71.02,
    "resnet32x4_ShuffleV1": 73.59, "wrn_40_2_ShuffleV1": 73.73, "vgg13_MobileNetV2": 64.14,
    "ResNet50_MobileNetV2": 63.16, "resnet32x4_ShuffleV2": 73.54,
    # the CRD table's two pairs beyond the 11 of the DKD and ReviewKD tables (PAPERS.md section 6)
    "resnet110_resnet20": 68.99, "ResNet50_vgg8": 70.69,
}


# ------------------------------------------------------------------ the hint loss
def test_hint_loss_by_hand():
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hint_loss(fs, torch.zeros_like(fs)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # Two samples, two channels: differences 1 and 3 on half the elements each.
    ft = torch.zeros(2, 2, 1, 1)
    fs = torch.tensor([1.0, 1.0, 3.0, 3.0]).view(2, 2, 1, 1)
    assert hint_loss(fs, ft).item() == pytest.approx((1 + 1 + 9 + 9) / 4)


def reference_hint(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Romero et al.'s Eq. (3), 1/2 ||u - r||^2 per sample, written as loops, then brought to
    the benchmarks' form: twice its batch mean divided by the map's element count."""
    n = fs.shape[0]
    per_sample = []
    for i in range(n):
        squared = 0.0
        for a, b in zip(fs[i].flatten().tolist(), ft[i].flatten().tolist()):
            squared += (a - b) ** 2
        per_sample.append(0.5 * squared)
    return 2 * (sum(per_sample) / n) / fs[0].numel()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 10))
def test_hint_loss_matches_the_paper_written_out(n, c, h, w, seed, scale):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    ft = torch.relu(torch.randn(n, c, h, w, generator=g, dtype=torch.float64))
    value = hint_loss(fs, ft)
    assert value.item() == pytest.approx(reference_hint(fs, ft), rel=1e-12, abs=1e-12)
    assert hint_loss(ft, ft).item() == 0.0
    torch.testing.assert_close(hint_loss(ft, fs), value)  # symmetric in value
    torch.testing.assert_close(hint_loss(scale * fs, scale * ft), scale**2 * value)


def test_hint_loss_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: hint_loss(s, ft), (fs,))
    # d/ds mean((s - t)^2) = 2 (s - t) / numel
    (grad,) = torch.autograd.grad(hint_loss(fs, ft), fs)
    torch.testing.assert_close(grad, 2 * (fs - ft) / fs.numel())
    t = ft.clone().requires_grad_(True)
    hint_loss(fs, t).backward()
    assert t.grad is None  # the teacher is a constant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hint_loss_is_finite_float32_where_half_precision_overflows(dtype):
    fs = torch.full((2, 3, 4, 4), 1000.0, dtype=dtype)  # squares (1e6) overflow float16
    value = hint_loss(fs, torch.zeros_like(fs))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(1e6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(hint_loss(fs.float() * 100, torch.zeros(2, 3, 4, 4)))


def test_hint_loss_refuses_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# ------------------------------------------------------------------ the regressor
@pytest.mark.parametrize("student, teacher, kind", [
    ((16, 8, 8), (32, 8, 8), (nn.Conv2d, (1, 1), (1, 1))),
    ((16, 16, 16), (32, 8, 8), (nn.Conv2d, (3, 3), (2, 2))),
    ((16, 4, 4), (32, 8, 8), (nn.ConvTranspose2d, (4, 4), (2, 2))),
    ((16, 6, 6), (32, 4, 4), (nn.Conv2d, (3, 3), (1, 1))),
])
def test_regressor_matches_the_reference_rules(student, teacher, kind):
    reg = ConvRegressor(StageInfo(*student), StageInfo(*teacher))
    cls, kernel, stride = kind
    assert type(reg.conv) is cls and reg.conv.kernel_size == kernel and reg.conv.stride == stride
    out = reg(torch.randn(2, *student))
    assert out.shape == (2, *teacher)
    assert (out >= 0).all()  # conv -> batch norm -> ReLU, like the teacher's post-activation map


def test_regressor_refuses_sizes_it_cannot_map():
    with pytest.raises(ConfigError, match="hint_stage"):
        ConvRegressor(StageInfo(16, 2, 2), StageInfo(32, 8, 8))


# ------------------------------------------------------------------ the method
def build(teacher: str, student: str, classes: int = 100, **cfg) -> FitNet:
    torch.manual_seed(0)
    cls = method_class("fitnet")
    return cls(create_model(student, classes), create_model(teacher, classes), cls.Config(**cfg),
               input_size=(3, 32, 32), num_classes=classes)


# For every published pair, the regressor the reference code (ConvReg) would build at HINT_LAYER 2.
REFERENCE_REGRESSORS = {
    ("resnet56", "resnet20"): (nn.Conv2d, 32, 32, (1, 1)),
    ("resnet110", "resnet32"): (nn.Conv2d, 32, 32, (1, 1)),
    ("resnet32x4", "resnet8x4"): (nn.Conv2d, 128, 128, (1, 1)),
    ("wrn_40_2", "wrn_16_2"): (nn.Conv2d, 64, 64, (1, 1)),
    ("wrn_40_2", "wrn_40_1"): (nn.Conv2d, 32, 64, (1, 1)),
    ("vgg13", "vgg8"): (nn.Conv2d, 256, 256, (1, 1)),
    ("resnet32x4", "ShuffleV1"): (nn.ConvTranspose2d, 480, 128, (4, 4)),
    ("resnet32x4", "ShuffleV2"): (nn.ConvTranspose2d, 232, 128, (4, 4)),
    ("wrn_40_2", "ShuffleV1"): (nn.ConvTranspose2d, 480, 64, (4, 4)),
    ("vgg13", "MobileNetV2"): (nn.Conv2d, 16, 256, (1, 1)),
    ("ResNet50", "MobileNetV2"): (nn.ConvTranspose2d, 16, 512, (4, 4)),
}


@pytest.mark.slow  # builds the 11 published pairs (about 5 s)
def test_every_published_pair_gets_the_reference_regressor():
    for (teacher, student), (cls, cin, cout, kernel) in REFERENCE_REGRESSORS.items():
        conv = build(teacher, student).regressor.conv
        assert (type(conv), conv.in_channels, conv.out_channels, conv.kernel_size) == (cls, cin, cout, kernel), (
            teacher, student)


def context(n: int = 32, classes: int = 100) -> SetupContext:
    return SetupContext(train_set=range(n), num_train_samples=n, num_classes=classes,
                        data_cfg=load_config(data={"model": {"name": "resnet8"}}).data, seed=0,
                        device=torch.device("cpu"), run_dir=None)


@pytest.mark.parametrize("teacher, student", [
    ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
])
def test_trains_through_the_protocol_with_the_teacher_frozen(teacher, student):
    d = build(teacher, student)
    assert d.needs_teacher_features and d.requires_teacher and not d.needs_sample_indices
    d.setup(context())  # the default no-op hook
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in d.regressor.parameters())
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    extra = d.extra_state_dict()
    assert extra and all(k.startswith("regressor.") for k in extra)
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    reg_before = {k: v.clone() for k, v in d.regressor.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    d.train()
    for step in (1, 2):
        batch = Batch(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g),
                      indices=torch.arange(4))
        out = d(batch, step)  # through forward, as the engine (and DDP) call it
        assert set(out.losses) == {"ce", "hint"} and out.logits.shape == (4, 100)
        # The hint term, recomputed from the two networks directly.
        with torch.no_grad():
            _, tf = d.teacher(batch.images, features=True)
            _, sf = d.student(batch.images, features=True)
            expected = 100.0 * F.mse_loss(d.regressor(sf.raw_stages[1]), tf.raw_stages[1])
        torch.testing.assert_close(out.losses["hint"].detach(), expected)
        torch.testing.assert_close(out.stats["hint_mse"] * 100.0, expected)
        opt.zero_grad()
        sum(out.losses.values()).backward()
        assert all(p.grad is None for p in d.teacher.parameters())
        opt.step()
    for k, v in d.teacher.state_dict().items():  # weights and batch-norm statistics
        torch.testing.assert_close(v, teacher_before[k])
    assert any(not torch.equal(v, reg_before[k]) for k, v in d.regressor.state_dict().items())
    assert not d.teacher.training


def test_other_stages_and_bad_stages():
    d = build("resnet32x4", "resnet8x4", hint_stage=3, guided_stage=2)  # student 16x16 -> teacher 8x8
    assert d.regressor.conv.stride == (2, 2) and d.guided_index == 1 and d.hint_index == 2
    with pytest.raises(ConfigError, match=r"hint_stage=4 is not a stage of the teacher .*1\.\.3"):
        build("resnet32x4", "resnet8x4", hint_stage=4, guided_stage=1)
    with pytest.raises(ConfigError, match=r"guided_stage=5 is not a stage of the student"):
        build("resnet32x4", "resnet8x4", guided_stage=5)


def test_refuses_a_model_without_stage_features():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ConfigError, match=r"does not accept model\(x, features=True\)"):
        FitNet(Plain(), create_model("resnet8", 10), FitNetConfig())


def test_mixed_precision_step_is_finite():
    d = build("resnet8", "resnet8", classes=10)
    d.train()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d.forward_train(batch, 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    """`kdlab train` with method fitnet: the hint term is logged and the regressor checkpointed."""
    import json

    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    Trainer(load_config(data=make_config(name="teacher"))).fit()
    teacher = {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "teacher" / "last.pt")}
    Trainer(load_config(data=make_config(name="fitnet", teacher=teacher, method={"name": "fitnet"}))).fit()
    row = json.loads((tmp_path / "runs" / "fitnet" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/hint"] == pytest.approx(100 * row["stat/hint_mse"]) and row["train/hint"] > 0
    extra = Checkpoint.load(tmp_path / "runs" / "fitnet" / "last.pt").extra_state
    assert extra and all(k.startswith("regressor.") for k in extra)


# ------------------------------------------------------------------ configs and rows
def test_every_fitnet_config_loads_with_the_papers_settings():
    paths = sorted(glob.glob(str(ROOT / "configs" / "cifar100" / "fitnet" / "*.yaml")))
    assert {Path(p).stem for p in paths} == set(PUBLISHED)
    for path in paths:
        cfg = load_config(path)
        assert cfg.method.name == "fitnet" and cfg.name == "fitnet_" + Path(path).stem
        assert (cfg.method.ce_weight, cfg.method.hint_weight, cfg.method.hint_stage) == (1.0, 100.0, 2)
        assert cfg.method.guided_stage is None
        assert f"{cfg.teacher.name}_{cfg.model.name}" == Path(path).stem
        assert cfg.teacher.checkpoint == f"runs/teacher_{cfg.teacher.name}/last.pt"
        small = cfg.model.name in ("ShuffleV1", "ShuffleV2", "MobileNetV2")
        assert cfg.optim.lr == (0.01 if small else 0.05) and cfg.data.batch_size == 64
        assert cfg.train.epochs == 240 and cfg.schedule.milestones == [150, 180, 210]


def test_reproduce_rows_carry_the_published_numbers():
    from kdlab.reproduce.table import load_rows

    rows = {r.id: r for r in load_rows() if r.method == "fitnet"}
    assert {i.split("/")[-1] for i in rows} == set(PUBLISHED)
    for pair, number in PUBLISHED.items():
        row = rows[f"fitnet/cifar100/{pair}"]
        assert row.published == number and row.metric == "top1" and row.dataset == "cifar100"
        assert row.config == f"configs/cifar100/fitnet/{pair}.yaml" and (ROOT / row.config).is_file()
        assert (ROOT / row.teacher_config).is_file()
