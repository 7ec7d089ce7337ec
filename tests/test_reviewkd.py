"""ReviewKD: the hierarchical context loss, the attention-based fusion, pairing of any two zoo
models, the published configs, ReviewKD + DKD, and training behaviour (ABFs trained, teacher
frozen, batches of one sample)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.methods.base import Batch
from kdlab.config import load_config
from kdlab.errors import ConfigError, TrainingError
from kdlab.losses import dkd_terms, hcl_level, hcl_loss
from kdlab.methods import method_class
from kdlab.methods.reviewkd import ABF, STUDENT_STAGES, ReviewKD, conv1x1_bn, resize_map
from kdlab.models import FeatureClassifier, Features, create_model

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ HCL, by hand
def one_map(rows):
    return torch.tensor(rows, dtype=torch.float64)[None, None]


def test_hcl_4x4_skips_the_4x4_pooling_and_halves_per_used_level():
    # f_s - f_t is constant on 2x2 blocks: full MSE = (1+9+25+49)/4 = 21, 2x2 pooling keeps the
    # blocks (MSE 21), 1x1 pooling gives the mean 4 (MSE 16). 4x4 pooling is skipped, so the
    # weights are 1/2 and 1/4: (21 + 21/2 + 16/4) / 1.75.
    fs = one_map([[1, 1, 3, 3], [1, 1, 3, 3], [5, 5, 7, 7], [5, 5, 7, 7]])
    expected = (21 + 21 / 2 + 16 / 4) / 1.75
    assert hcl_level(fs, torch.zeros_like(fs)).item() == pytest.approx(expected)
    assert hcl_level(fs + 2.0, torch.full_like(fs, 2.0)).item() == pytest.approx(expected)


def test_hcl_8x8_uses_4_2_1_normalised_by_1_875():
    # A pixel checkerboard of +-1: full MSE 1, every pooled map is 0.
    i = torch.arange(8)
    fs = ((i[:, None] + i[None, :]) % 2 * 2 - 1).double()[None, None]
    assert hcl_level(fs, torch.zeros_like(fs)).item() == pytest.approx(1 / 1.875)


def test_hcl_2x2_and_1x1():
    fs = one_map([[1, 3], [5, 7]])
    assert hcl_level(fs, torch.zeros_like(fs)).item() == pytest.approx((21 + 16 / 2) / 1.5)
    assert hcl_level(one_map([[3.0]]), one_map([[0.0]])).item() == pytest.approx(9.0)


def test_hcl_loss_sums_levels_and_checks_shapes():
    a, b = one_map([[1, 3], [5, 7]]), one_map([[3.0]])
    total = hcl_loss([a, b], [torch.zeros_like(a), torch.zeros_like(b)])
    assert total.item() == pytest.approx((21 + 8) / 1.5 + 9)
    with pytest.raises(ValueError, match="same"):
        hcl_loss([a], [b])
    with pytest.raises(ValueError, match="as many"):
        hcl_loss([a, b], [a])


def reference_hcl(fs, ft):
    """The authors' loop, transcribed: pool sizes 4, 2, 1 below h, weights halved when used."""
    h = fs.shape[2]
    loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= h:
            continue
        cnt /= 2.0
        loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * cnt
        tot += cnt
    return loss / tot


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), seed=st.integers(0, 2**16),
       shift=st.floats(-3, 3), scale=st.floats(0.1, 10))
def test_hcl_properties(n, c, h, seed, shift, scale):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, c, h, h, generator=g, dtype=torch.float64)
    ft = torch.randn(n, c, h, h, generator=g, dtype=torch.float64)
    value = hcl_level(fs, ft)
    torch.testing.assert_close(value, reference_hcl(fs, ft))
    assert value >= 0
    assert hcl_level(fs, fs).item() == 0.0
    torch.testing.assert_close(hcl_level(ft, fs), value)  # symmetric
    torch.testing.assert_close(hcl_level(scale * fs, scale * ft), scale**2 * value)
    # A constant offset has the same MSE at every pooling level, so normalisation gives shift^2.
    torch.testing.assert_close(hcl_level(ft + shift, ft), torch.tensor(shift**2, dtype=torch.float64))


def test_hcl_gradient_reaches_the_student_only():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 3, 4, 4, requires_grad=True)
    hcl_loss([fs], [ft]).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


def test_hcl_is_float32_under_half_inputs():
    fs, ft = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    assert hcl_level(fs, ft).dtype == torch.float32


# ------------------------------------------------------------------ ABF, by hand
def identity_bn(bn: nn.BatchNorm2d) -> None:
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(var + eps) = x exactly
    bn.weight.data.fill_(1.0)
    bn.bias.data.zero_()


def hand_abf() -> ABF:
    """A 1-channel ABF whose convs and batch-norms are identities and whose attention is
    a_0 = sigmoid(x - y), a_1 = sigmoid(log 3) = 3/4."""
    abf = ABF(1, 1, 1, fuse=True).double().eval()
    with torch.no_grad():
        abf.conv1[0].weight.fill_(1.0)
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[0, 0, 1, 1] = 1.0
        abf.att_conv[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(2, 2, 1, 1))
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    identity_bn(abf.conv1[1])
    identity_bn(abf.conv2[1])
    return abf


def test_abf_fuses_with_two_attention_maps_from_the_concatenation():
    abf = hand_abf()
    x = one_map([[0.0, 1.0], [2.0, -1.0]])
    residual = one_map([[0.5]])  # deeper level, 1x1: nearest-upsampled to 2x2
    out, res = abf(x, residual, (4, 4))
    y = torch.full_like(x, 0.5)
    fused = x * torch.sigmoid(x - y) + 0.75 * y
    expected = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the teacher's 4x4
    torch.testing.assert_close(res, expected)
    torch.testing.assert_close(out, expected)  # conv2 and its batch-norm are identities here


@pytest.mark.parametrize("size, residual", [(8, 4), (8, 1), (6, 6), (8, 2), (6, 4), (4, 8)])
def test_abf_fusion_equals_the_literal_concatenation(size, residual):
    """Integer enlargements take a path that never builds up(y) or the concatenation; it must
    equal the paper's computation, values and gradients (other ratios compute it literally)."""
    torch.manual_seed(size * 10 + residual)
    abf = ABF(3, 5, 2, fuse=True).double()
    x = torch.randn(2, 5, size, size, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, residual, residual, dtype=torch.float64, requires_grad=True)
    y_up = F.interpolate(y, size=(size, size), mode="nearest") if size >= residual else resize_map(y, (size, size))
    a = abf.att_conv(torch.cat([x, y_up], dim=1))
    literal = x * a[:, 0:1] + y_up * a[:, 1:2]
    fused = abf.fuse(x, y)
    torch.testing.assert_close(fused, literal)
    w = abf.att_conv[0].weight
    g = torch.randn_like(literal)
    for a_, b_ in zip(torch.autograd.grad(fused, [x, y, w], g), torch.autograd.grad(literal, [x, y, w], g)):
        torch.testing.assert_close(a_, b_)


def test_deepest_abf_has_no_fusion_and_maps_to_teacher_channels():
    abf = ABF(8, 4, 6, fuse=False)
    assert abf.att_conv is None
    out, res = abf(torch.randn(2, 8, 1, 1), None, (1, 1))
    assert out.shape == (2, 6, 1, 1) and res.shape == (2, 4, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        ABF(8, 4, 6, fuse=True)(torch.randn(2, 8, 2, 2), None, (2, 2))


def test_resize_map_enlarges_by_nearest_and_shrinks_by_averaging():
    x = one_map([[1, 2], [3, 4]])
    big = resize_map(x, (4, 4))
    torch.testing.assert_close(big, x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    torch.testing.assert_close(resize_map(big, (2, 2)), x)
    torch.testing.assert_close(resize_map(one_map([[1, 3], [5, 7]]), (1, 1)), one_map([[4.0]]))
    assert resize_map(x, (2, 2)) is x


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), sh=st.integers(1, 4), sw=st.integers(1, 4))
def test_integer_enlargements_equal_nearest_interpolation(h, w, sh, sw):
    x = torch.randn(2, 3, h, w, requires_grad=True)
    size = (h * sh, w * sw)
    ours, theirs = resize_map(x, size), F.interpolate(x, size=size, mode="nearest")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 5), c=st.integers(1, 6), m=st.integers(1, 9), hw=st.sampled_from([1, 2, 5]),
       shift=st.floats(-3, 3), momentum=st.sampled_from([0.1, 0.5, None]), seed=st.integers(0, 999))
def test_conv1x1_bn_equals_the_convolution_then_the_batch_norm(n, c, m, hw, shift, momentum, seed):
    """The folded training-mode form: values, every gradient, running statistics and their
    counter as nn.Conv2d then nn.BatchNorm2d give them (float64, so to rounding)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, m, 1, bias=False).double()
    bn = nn.BatchNorm2d(m, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = (torch.randn(n, c, hw, hw, dtype=torch.float64) + shift).requires_grad_()
    ours, theirs = conv1x1_bn(x, conv, bn), bn2(conv2(x))
    torch.testing.assert_close(ours, theirs)
    g = torch.randn_like(ours)
    params = [x, conv.weight, bn.weight, bn.bias]
    params2 = [x, conv2.weight, bn2.weight, bn2.bias]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(theirs, params2, g)):
        torch.testing.assert_close(a, b)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn2, name))


def test_conv1x1_bn_leaves_evaluation_and_sync_batch_norm_to_the_modules():
    conv, bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 4, 4)
    bn.eval()
    torch.testing.assert_close(conv1x1_bn(x, conv, bn), bn(conv(x)))
    assert int(bn.num_batches_tracked) == 0
    calls = []
    sync = nn.SyncBatchNorm(4)
    sync.forward = lambda t: calls.append(t) or t  # this instance only: record that it ran itself
    conv1x1_bn(x, conv, sync)
    assert len(calls) == 1


# ------------------------------------------------------------------ pairing every zoo pair
def build(teacher: str, student: str, input_size=(3, 32, 32), classes=100, **method) -> ReviewKD:
    cls = method_class(method.pop("name", "reviewkd"))
    torch.manual_seed(0)
    return cls(create_model(student, classes), create_model(teacher, classes), cls.Config(**method),
               input_size=input_size, num_classes=classes)


def levels_of(d: ReviewKD, images: torch.Tensor):
    """(student levels, teacher levels), deepest first, as forward_train builds them."""
    _, sf = d.student(images, features=True)
    _, tf = d.teacher_forward(images, features=True)
    s = d._select(sf, getattr(sf, STUDENT_STAGES[d.cfg.student_features]), [lv.student_stage for lv in d.levels])
    t = d._select(tf, tf.preact_stages, [lv.teacher_stage for lv in d.levels])
    return s, t


def assert_builds_and_trains(d: ReviewKD, images: torch.Tensor, n_levels: int) -> None:
    """One training step. `hcl_level` refuses maps of different shapes, so a finite loss means
    every fused level matched its teacher level in channels and size."""
    assert len(d.levels) == len(d.abfs) == n_levels
    for lv, abf in zip(d.levels, d.abfs):
        assert abf.conv1[0].in_channels == lv.student_channels
        assert abf.conv2[0].out_channels == lv.teacher_channels
    d.train()
    targets = torch.arange(images.shape[0]) % 10
    out = d(Batch(images, targets), 30)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss) and set(out.losses) == {"ce", "reviewkd"}
    assert len([k for k in out.stats if k.startswith("hcl_")]) == n_levels
    loss.backward()
    for name, p in d.abfs.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in d.teacher.parameters())


# The ReviewKD paper's CIFAR-100 pairs (teacher, student, levels = min(stages) + pooled).
PUBLISHED_PAIRS = [
    ("resnet32x4", "resnet8x4", 4), ("resnet56", "resnet20", 4), ("resnet110", "resnet32", 4),
    ("wrn_40_2", "wrn_16_2", 4), ("wrn_40_2", "wrn_40_1", 4), ("resnet32x4", "ShuffleV1", 4),
    ("wrn_40_2", "ShuffleV1", 4), ("resnet32x4", "ShuffleV2", 4), ("vgg13", "vgg8", 5),
    ("ResNet50", "MobileNetV2", 5), ("vgg13", "MobileNetV2", 5),
]


@pytest.mark.parametrize("teacher, student, n_levels", PUBLISHED_PAIRS)
def test_every_published_pair_builds_and_trains_a_step(teacher, student, n_levels):
    d = build(teacher, student, weight=5.0)
    assert_builds_and_trains(d, torch.randn(2, 3, 32, 32), n_levels)


@pytest.mark.parametrize("teacher, student, pairs", [
    # The student has 4 stages, the teacher 3: deepest with deepest, the student's first unused.
    ("resnet32x4", "MobileNetV2", [(3, 2), (2, 1), (1, 0)]),
    # The teacher's maps (2..8) are smaller than the student's (8..32): shrunk by pooling.
    ("MobileNetV2", "resnet8", [(2, 3), (1, 2), (0, 1)]),
])
def test_pairs_with_other_stage_counts_and_sizes(teacher, student, pairs):
    d = build(teacher, student)
    assert [(lv.student_stage, lv.teacher_stage) for lv in d.levels] == [(None, None)] + pairs
    assert_builds_and_trains(d, torch.randn(2, 3, 32, 32), len(pairs) + 1)


@pytest.mark.parametrize("teacher, student, mid", [("tv:resnet34", "tv:resnet18", 512),
                                                    ("tv:resnet50", "MobileNetV1", 256)])
def test_imagenet_pairs_build_and_train_with_torchvision_models(teacher, student, mid):
    d = build(teacher, student, input_size=(3, 64, 64), classes=1000, student_features="preact",
              mid_channels=None if mid == 512 else mid)
    assert d.mid_channels == mid
    assert_builds_and_trains(d, torch.randn(2, 3, 64, 64), 5)


def test_abf_parameter_count_of_resnet32x4_resnet8x4_matches_the_paper():
    d = build("resnet32x4", "resnet8x4")
    assert d.mid_channels == 256  # min(512, the student's pooled width 256)
    n = sum(p.numel() for p in d.abfs.parameters())
    assert n == 1_808_774  # PAPERS.md: "the ABFs hold 1.81 M parameters"
    assert build("resnet32x4", "resnet8x4", mid_channels=64).mid_channels == 64


def test_teacher_levels_are_preactivation_and_stats_are_per_level_hcl():
    d = build("resnet14", "resnet8", weight=2.0, warmup_epochs=4).eval()
    images, targets = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    out = d(Batch(images, targets), 1)
    s, t = levels_of(d, images)
    per_level = [hcl_level(f, x) for f, x in zip(d.fuse(s, t), t)]
    assert list(out.stats) == ["hcl_pool", "hcl_s3_t3", "hcl_s2_t2", "hcl_s1_t1"]
    for value, stat in zip(per_level, out.stats.values()):
        torch.testing.assert_close(stat, value.detach())
    # weight x warm-up (epoch 1 of 4) x summed HCL.
    torch.testing.assert_close(out.losses["reviewkd"], 2.0 * 0.25 * torch.stack(per_level).sum())
    # The teacher's post-activation maps would give another loss: the choice matters.
    _, tf = d.teacher(images, features=True)
    post = d._select(tf, tf.stages, [lv.teacher_stage for lv in d.levels])
    assert not torch.allclose(hcl_loss(d.fuse(s, post), post), torch.stack(per_level).sum())
    full = d(Batch(images, targets), 4).losses["reviewkd"]  # warm-up over: weight x HCL
    assert full.item() == pytest.approx(2.0 * torch.stack(per_level).sum().item(), rel=1e-5)


# ------------------------------------------------------------------ errors and batch size 1
class TokenModel(FeatureClassifier):
    """A transformer-like model: its 'stages' are token sequences (N, L, C)."""

    def __init__(self, stages=2):
        super().__init__()
        self.proj = nn.Linear(3 * 32 * 32, 16)
        self.head = nn.Linear(16, 100)
        self.n = stages

    def forward_features(self, x):
        tok = self.proj(x.flatten(1))[:, None, :].expand(-1, 4, -1)
        stages = [tok] * self.n
        return self.head(tok.mean(1)), Features(stages, stages, tok.mean(1))


def test_unpairable_models_get_one_clear_config_error():
    cls, cfg = method_class("reviewkd"), method_class("reviewkd").Config()
    student = create_model("resnet8", 100)
    with pytest.raises(ConfigError, match=r"features=True"):
        cls(student, nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)), cfg)
    with pytest.raises(ConfigError, match=r"teacher.*stage 1.*\(N, C, H, W\)"):
        cls(student, TokenModel(), cfg)
    with pytest.raises(ConfigError, match=r"student.*no stage features"):
        cls(TokenModel(stages=0), create_model("resnet8", 100), cfg)


def test_batch_of_one_sample_trains_with_running_statistics():
    d = build("resnet14", "resnet8").train()
    before = {k: v.clone() for k, v in d.abfs.state_dict().items() if "running" in k}
    out = d(Batch(torch.randn(1, 3, 32, 32), torch.tensor([3])), 25)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert d.abfs[0].conv1[0].weight.grad.abs().sum() > 0  # the pooled level still learns
    assert all(m.training for m in d.abfs.modules())  # training mode restored
    for k, v in before.items():
        torch.testing.assert_close(d.abfs.state_dict()[k], v)  # no update from one sample
    d(Batch(torch.randn(2, 3, 32, 32), torch.tensor([3, 4])), 25)
    assert not torch.equal(d.abfs[0].conv1[1].running_mean, before["0.conv1.1.running_mean"])


def test_batch_of_one_reaching_a_1x1_student_batch_norm_is_a_training_error():
    # MobileNet-V1 on 32x32 inputs ends in a 1x1 stage with batch-norm.
    d = build("resnet8", "MobileNetV1").train()
    with pytest.raises(TrainingError, match="batch of 1"):
        d(Batch(torch.randn(1, 3, 32, 32), torch.tensor([0])), 1)


# ------------------------------------------------------------------ ReviewKD + DKD
def test_reviewkd_dkd_adds_dkd_terms_to_the_same_reviewkd_term():
    both = build("resnet14", "resnet8", name="reviewkd_dkd", weight=3.0, beta=2.0, warmup_epochs=2).eval()
    alone = build("resnet14", "resnet8", weight=3.0, warmup_epochs=2).eval()
    alone.load_state_dict(both.state_dict())
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out, ref = both(Batch(images, targets), 1), alone(Batch(images, targets), 1)
    assert set(out.losses) == {"ce", "reviewkd", "tckd", "nckd"}
    torch.testing.assert_close(out.losses["reviewkd"], ref.losses["reviewkd"])
    torch.testing.assert_close(out.losses["ce"], ref.losses["ce"])
    terms = dkd_terms(both.student(images), both.teacher(images), targets, 4.0)
    torch.testing.assert_close(out.losses["tckd"], 0.5 * 1.0 * terms.tckd.mean())
    torch.testing.assert_close(out.losses["nckd"], 0.5 * 2.0 * terms.nckd.mean())
    assert {"tckd", "nckd", "teacher_conf", "hcl_pool"} <= set(out.stats)


# ------------------------------------------------------------------ checkpoints and training
def test_extra_state_is_the_abfs_and_round_trips():
    d = build("resnet14", "resnet8")
    state = d.extra_state_dict()
    assert state and all(k.startswith("abfs.") for k in state)
    other = build("resnet14", "resnet8", mid_channels=64)
    with torch.no_grad():
        for p in d.abfs.parameters():
            p.add_(1.0)
    other.load_extra_state_dict(d.extra_state_dict())
    for (k, a), b in zip(d.abfs.state_dict().items(), other.abfs.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_training_updates_the_abfs_and_never_the_teacher(make_config, tmp_path, monkeypatch):
    """Two batches on digits through the real trainer: the ABF parameters are in the optimizer
    and change; the teacher's weights and batch-norm buffers do not."""
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    torch.manual_seed(0)
    teacher = create_model("resnet8", 10)
    ckpt = tmp_path / "teacher.pt"
    Checkpoint.for_model(teacher, "resnet8", 10).save(ckpt)
    cfg = load_config(data=make_config(
        name="rkd", teacher={"name": "resnet8", "checkpoint": str(ckpt)},
        method={"name": "reviewkd", "weight": 5.0, "warmup_epochs": 1},
        data={"train_subset": 64, "batch_size": 32},
    ))
    seen = {}
    setup = Trainer.setup

    def spy(self):
        setup(self)
        seen["opt"] = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        seen["abfs"] = {k: v.clone() for k, v in self.distiller.abfs.state_dict().items()}
        seen["teacher"] = {k: v.clone() for k, v in self.distiller.teacher.state_dict().items()}
        seen["distiller"] = self.distiller

    monkeypatch.setattr(Trainer, "setup", spy)
    Trainer(cfg).fit()
    d = seen["distiller"]
    assert {id(p) for p in d.abfs.parameters()} <= seen["opt"]
    assert not {id(p) for p in d.teacher.parameters()} & seen["opt"]
    changed = [k for k, v in d.abfs.state_dict().items() if not torch.equal(v, seen["abfs"][k])]
    assert any(k.endswith("conv1.0.weight") for k in changed) and any("att_conv" in k for k in changed)
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, seen["teacher"][k]), k
    row = json.loads((tmp_path / "runs" / "rkd" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/reviewkd"] > 0 and math.isfinite(row["stat/hcl_pool"])
    saved = Checkpoint.load(tmp_path / "runs" / "rkd" / "last.pt")
    assert set(saved.extra_state) == set(d.extra_state_dict())


# ------------------------------------------------------------------ configs
# (teacher, student, loss weight, lr): the ReviewKD paper's CIFAR-100 pairs (PAPERS.md).
CIFAR100_WEIGHTS = [
    ("resnet32x4", "resnet8x4", 5.0, 0.1), ("resnet56", "resnet20", 0.6, 0.1),
    ("resnet110", "resnet32", 1.0, 0.1), ("wrn_40_2", "wrn_16_2", 5.0, 0.1),
    ("wrn_40_2", "wrn_40_1", 5.0, 0.1), ("resnet32x4", "ShuffleV1", 5.0, 0.02),
    ("wrn_40_2", "ShuffleV1", 5.0, 0.02), ("resnet32x4", "ShuffleV2", 8.0, 0.02),
    ("vgg13", "vgg8", 5.0, 0.1),
    ("ResNet50", "MobileNetV2", 30.0, 0.02), ("vgg13", "MobileNetV2", 30.0, 0.02),  # kdlab's weights
]


@pytest.mark.parametrize("teacher, student, weight, lr", CIFAR100_WEIGHTS)
def test_cifar100_configs_match_the_official_scripts(teacher, student, weight, lr):
    cfg = load_config(ROOT / "configs/cifar100/reviewkd" / f"{teacher}_{student}.yaml")
    assert (cfg.data.name, cfg.data.batch_size) == ("cifar100", 128)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (
        "sgd", lr, 0.9, True, 5e-4)
    assert (cfg.schedule.milestones, cfg.schedule.gamma, cfg.train.epochs) == ([150, 180, 210], 0.1, 240)
    assert (cfg.model.name, cfg.teacher.name, cfg.teacher.checkpoint) == (
        student, teacher, f"runs/teacher_{teacher}/best.pt")
    m = cfg.method
    assert (m.name, m.ce_weight, m.weight, m.warmup_epochs, m.mid_channels, m.student_features) == (
        "reviewkd", 1.0, weight, 20, None, "raw")
    assert cfg.name == f"reviewkd_{teacher}_{student}"


def test_cifar100_config_set_is_complete():
    expected = {f"{t}_{s}.yaml" for t, s, _, _ in CIFAR100_WEIGHTS}
    assert {p.name for p in (ROOT / "configs/cifar100/reviewkd").glob("*.yaml")} == expected


def test_reviewkd_dkd_config():
    cfg = load_config(ROOT / "configs/cifar100/reviewkd_dkd/resnet32x4_resnet8x4.yaml")
    m = cfg.method
    assert (m.name, m.weight, m.alpha, m.beta, m.temperature, m.warmup_epochs) == (
        "reviewkd_dkd", 5.0, 1.0, 8.0, 4.0, 20)
    assert (cfg.model.name, cfg.teacher.name) == ("resnet8x4", "resnet32x4")


@pytest.mark.parametrize("pair, teacher, student, weight, mid", [
    ("resnet34_resnet18", "tv:resnet34", "tv:resnet18", 1.0, None),
    ("resnet50_MobileNetV1", "tv:resnet50", "MobileNetV1", 8.0, 256),
])
def test_imagenet_configs(monkeypatch, pair, teacher, student, weight, mid):
    from kdlab.models import registry

    if "tv" not in registry._PREFIXES:  # validate the rest of the schema until tv: lands
        monkeypatch.setitem(registry._PREFIXES, "tv", lambda name, **kw: None)
    cfg = load_config(ROOT / "configs/imagenet/reviewkd" / f"{pair}.yaml")
    assert (cfg.data.name, cfg.data.transform, cfg.data.batch_size) == ("imagefolder", "imagenet", 256)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.1, 0.9, False, 1e-4)
    assert (cfg.schedule.milestones, cfg.train.epochs) == ([30, 60, 90], 100)
    assert (cfg.model.name, cfg.teacher.name) == (student, teacher) and cfg.teacher.weights
    m = cfg.method
    assert (m.name, m.weight, m.warmup_epochs, m.mid_channels, m.student_features) == (
        "reviewkd", weight, 1, mid, "preact")


def test_config_validation():
    cls = method_class("reviewkd").Config
    assert cls().model_dump() == {"name": "reviewkd", "ce_weight": 1.0, "weight": 1.0, "warmup_epochs": 20,
                                  "mid_channels": None, "student_features": "raw"}
    for bad in ({"weight": -1.0}, {"mid_channels": 0}, {"warmup_epochs": -1}, {"weigth": 1.0}):
        with pytest.raises(Exception):
            cls(**bad)
    with pytest.raises(ConfigError, match="weigth"):
        load_config(data={"model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": "t.pt"},
                          "method": {"name": "reviewkd", "weigth": 2.0}})


# ------------------------------------------------------------------ which student features
def randomise_batch_norms(model: nn.Module) -> None:
    """Batch-norms that are not identities in eval mode, so bn(f) != f."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)


def abf_inputs(d: ReviewKD, images: torch.Tensor, targets: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The student level each ABF receives in one training step (deepest first), and the loss."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [abf.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
             for i, abf in enumerate(d.abfs)]
    try:
        out = d(Batch(images, targets), 30)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(d.abfs))], out.losses["reviewkd"]


def test_wrn_student_abfs_read_the_raw_block_outputs_by_default():
    """The DKD authors' and the official ReviewKD code feed a WRN student's raw block outputs
    f_i (no BN, no ReLU) to the fusion. Computed independently here by forward hooks on the
    last block of each stage, they must be what the ABFs receive, and differ from relu(bn(f_i))."""
    d = build("wrn_40_2", "wrn_16_2", weight=5.0)
    assert d.cfg.student_features == "raw"
    randomise_batch_norms(d.student)
    d.eval()  # fixed batch-norm statistics, so relu(bn(f)) can be recomputed below
    student = d.student
    blocks = [student.block1.layer[-1], student.block2.layer[-1], student.block3.layer[-1]]
    raw: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: raw.__setitem__(i, out.detach().clone()))
             for i, b in enumerate(blocks)]
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4)
    try:
        inputs, loss_raw = abf_inputs(d, images, targets)
    finally:
        for h in hooks:
            h.remove()
    assert [(lv.student_stage, lv.teacher_stage) for lv in d.levels] == [(None, None), (2, 2), (1, 1), (0, 0)]
    consuming_bn = [student.block2.layer[0].bn1, student.block3.layer[0].bn1, student.bn1]
    with torch.no_grad():
        post = [torch.relu(bn(raw[i])) for i, bn in enumerate(consuming_bn)]
    for level, stage in zip(inputs[1:], (2, 1, 0)):
        torch.testing.assert_close(level, raw[stage], rtol=0, atol=0)
        relative = (level - post[stage]).norm() / post[stage].norm()
        assert relative > 0.1, f"stage {stage + 1}: raw and relu(bn(f)) differ by only {relative:.3f}"

    # post (kdlab's earlier default) is still reachable, reads relu(bn(f_i)), and changes the loss
    d_post = build("wrn_40_2", "wrn_16_2", weight=5.0, student_features="post")
    d_post.load_state_dict(d.state_dict())
    d_post.eval()
    inputs_post, loss_post = abf_inputs(d_post, images, targets)
    for level, stage in zip(inputs_post[1:], (2, 1, 0)):
        torch.testing.assert_close(level, post[stage])
    assert not torch.allclose(loss_raw, loss_post)


@pytest.mark.parametrize("student", ["resnet8", "ShuffleV1", "vgg8", "MobileNetV2"])
def test_raw_student_features_are_the_post_activation_stages_outside_preact_families(student):
    """For every other family the reference code's `feats` are the stages themselves."""
    teacher = "vgg13" if student in ("vgg8", "MobileNetV2") else "resnet14"
    d = build(teacher, student).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inputs, _ = abf_inputs(d, images, torch.arange(2))
        _, feats = d.student(images, features=True)
    for level, lv in zip(inputs[1:], d.levels[1:]):
        torch.testing.assert_close(level, feats.stages[lv.student_stage], rtol=0, atol=0)


def test_student_preact_in_older_configs_keeps_its_meaning():
    cls = method_class("reviewkd").Config
    assert cls(student_preact=True).student_features == "preact"
    assert cls(student_preact=False).student_features == "post"  # kdlab's earlier default
    assert cls().student_features == "raw"
    assert "student_preact" not in cls(student_preact=True).model_dump()
    assert method_class("reviewkd_dkd").Config(student_preact=True).student_features == "preact"
    with pytest.raises(Exception, match="student_features only"):
        cls(student_preact=True, student_features="raw")
    with pytest.raises(Exception, match="'raw', 'preact' or 'post'"):
        cls(student_features="auto")
    with pytest.raises(ConfigError, match="student_features only"):
        load_config(data={"model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": "t.pt"},
                          "method": {"name": "reviewkd", "student_preact": True, "student_features": "post"}})
