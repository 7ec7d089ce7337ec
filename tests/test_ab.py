"""AB: the loss against RepDistiller's transcribed in float64 and hand values, the connectors and
pre-activations the reference chooses, the two method-owned phases through the protocol and the
trainer, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.errors import ConfigError
from kdlab.losses.ab import ab_loss, activation_boundary_loss
from kdlab.methods.ab import ab_connector
from kdlab.models import StageInfo

from featurekit import (THREE_PAIRS, assert_phases, batch, build_pair, check_bf16_step_is_finite, check_cifar_rows,
                        cifar_configs, train_two_phases)

# PAPERS.md section 6: AB top-1 on CIFAR-100 (CRD benchmark README).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 72.50, "wrn_40_2_wrn_40_1": 72.38, "resnet56_resnet20": 69.47,
    "resnet110_resnet20": 69.53, "resnet110_resnet32": 70.98, "resnet32x4_resnet8x4": 73.17,
    "vgg13_vgg8": 70.94, "vgg13_MobileNetV2": 66.06, "ResNet50_MobileNetV2": 67.20, "ResNet50_vgg8": 70.65,
    "resnet32x4_ShuffleV1": 73.55, "resnet32x4_ShuffleV2": 74.31, "wrn_40_2_ShuffleV1": 73.34,
}


# ------------------------------------------------------------------ the reference, transcribed
class ReferenceABLoss:
    """RepDistiller distiller_zoo/AB.py (ABLoss) @ b84f547; helper/pretrain.py sums its list."""

    def __init__(self, feat_num, margin=1.0):
        self.w = [2**(i-feat_num+1) for i in range(feat_num)]
        self.margin = margin

    def __call__(self, g_s, g_t):
        bsz = g_s[0].shape[0]
        losses = [self.criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
        losses = [w * l for w, l in zip(self.w, losses)]
        losses = [l / bsz for l in losses]
        losses = [l / 1000 * 3 for l in losses]
        return sum(losses)

    def criterion_alternative_l2(self, source, target):
        loss = ((source + self.margin) ** 2 * ((source > -self.margin) & (target <= 0)).float() +
                (source - self.margin) ** 2 * ((source <= self.margin) & (target > 0)).float())
        return torch.abs(loss).sum()


def reference_connector(s_shape, t_shape):
    """RepDistiller models/util.py Connector._make_conenctors and ConvReg(use_relu=False) for one
    stage, as (conv class, in, out, kernel, stride), or 'identity'."""
    s_N, s_C, s_H, s_W = s_shape
    t_N, t_C, t_H, t_W = t_shape
    if s_C == t_C and s_H == t_H:
        return "identity"
    if s_H == 2 * t_H:
        return (nn.Conv2d, s_C, t_C, (3, 3), (2, 2))
    if s_H * 2 == t_H:
        return (nn.ConvTranspose2d, s_C, t_C, (4, 4), (2, 2))
    if s_H >= t_H:
        return (nn.Conv2d, s_C, t_C, (1 + s_H - t_H, 1 + s_W - t_W), (1, 1))
    raise NotImplementedError


def describe(connector: nn.Module):
    if isinstance(connector, nn.Identity):
        return "identity"
    c = connector.conv
    return (type(c), c.in_channels, c.out_channels, c.kernel_size, c.stride)


def test_by_hand():
    t_on, t_off = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    for s, t, expected in ((0.5, t_on, 0.25), (2.0, t_on, 0.0), (-3.0, t_on, 16.0), (-0.5, t_off, 0.25),
                           (-2.0, t_off, 0.0), (0.5, t_off, 2.25)):
        assert activation_boundary_loss(torch.full((1, 1, 1, 1), s), t).item() == expected, (s, t)
    # Two stages, batch 2: weights 1/2 and 1, divided by the batch, times 3/1000.
    s = [torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), 0.5)]
    t = [torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)]
    assert ab_loss(s, t).item() == pytest.approx((0.5 * 2 * 0.25 + 1.0 * 2 * 2.25) / 2 * 3 / 1000)


shapes = st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(levels=shapes, n=st.integers(1, 3), seed=st.integers(0, 2**16), scale=st.floats(0.1, 5),
       margin=st.sampled_from([1.0, 0.5, 2.0]))
def test_loss_and_gradients_equal_the_reference(levels, n, seed, scale, margin):
    g = torch.Generator().manual_seed(seed)
    s = [(torch.randn(n, c, h, h, generator=g, dtype=torch.float64) * scale).requires_grad_() for c, h in levels]
    t = [torch.randn(n, c, h, h, generator=g, dtype=torch.float64) for c, h in levels]
    ours, ref = ab_loss(s, t, margin), ReferenceABLoss(len(levels), margin)(s, t)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(ours, s), torch.autograd.grad(ref, s), rtol=1e-10, atol=1e-15)
    # Beyond the margin on the teacher's side, nothing is left to learn.
    assert ab_loss([torch.where(m > 0, 2.0 * margin, -2.0 * margin) for m in t], t, margin).item() == 0.0


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ab_loss([a], [t]), (s,))
    ab_loss([s], [t]).backward()
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_where_half_precision_overflows(dtype):
    s = torch.full((2, 3, 4, 4), 1000.0, dtype=dtype)  # (s + 1)^2 = 1e6 overflows float16
    value = activation_boundary_loss(s, -torch.ones_like(s))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(1001.0**2 * s.numel())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ab_loss([s.float() * 1000], [-torch.ones(2, 3, 4, 4)])
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_refuses_mismatched_maps():
    with pytest.raises(ValueError, match="same shape"):
        activation_boundary_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="as many"):
        ab_loss([torch.zeros(1, 2, 2, 2)], [])


# ------------------------------------------------------------------ connectors and pairs
def build(teacher: str, student: str, classes: int = 100, **cfg):
    return build_pair("ab", teacher, student, classes, **cfg)



@pytest.fixture(scope="module")
def pairs():
    return {pair: build(*pair) for pair in THREE_PAIRS}


# The reference's feat[1:-1] with preact=True (RepDistiller models) for each network, (C, H).
REFERENCE_PREACT = {
    "resnet32x4": [(64, 32), (128, 16), (256, 8)], "resnet8x4": [(64, 32), (128, 16), (256, 8)],
    "ShuffleV2": [(116, 16), (232, 8), (464, 4)],
    "vgg13": [(128, 16), (256, 8), (512, 4), (512, 4)], "MobileNetV2": [(12, 16), (16, 8), (48, 4), (160, 2)],
}


@pytest.mark.parametrize("pair", THREE_PAIRS)
def test_connectors_and_maps_are_the_references(pairs, pair):
    d = pairs[pair]
    d.train()
    b = batch()
    with torch.no_grad():
        _, sf = d.student(b.images, features=True)
        _, tf = d.teacher(b.images, features=True)
    teacher, student = pair
    for name, maps in ((student, sf.preact_stages), (teacher, tf.preact_stages)):
        assert [(m.shape[1], m.shape[2]) for m in maps] == REFERENCE_PREACT[name]
    expected = [reference_connector((1, *s), (1, *t)) for s, t in
                zip(((c, h, h) for c, h in REFERENCE_PREACT[student]), ((c, h, h) for c, h in REFERENCE_PREACT[teacher]))]
    assert [describe(c) for c in d.connectors] == expected
    for c in d.connectors:  # conv + batch norm, no ReLU: a pre-activation is matched
        assert isinstance(c, nn.Identity) or (isinstance(c.bn, nn.BatchNorm2d) and isinstance(c.relu, nn.Identity))
    value = d(b, 1).losses["ab"].detach()
    with torch.no_grad():
        connected = [c(f) for c, f in zip(d.connectors, sf.preact_stages)]
    reference = ReferenceABLoss(len(connected))([m.double() for m in connected],
                                                [m.double() for m in tf.preact_stages])
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=0)
    if pair == THREE_PAIRS[0]:  # identity connectors: pre-activations, not the ReLU outputs
        assert not torch.allclose(value, ab_loss(sf.stages, tf.stages))


def test_refuses_pairs_it_cannot_serve():
    with pytest.raises(ConfigError, match=r"AB cannot serve .*student has 4 stages and the teacher 3"):
        build("resnet8", "vgg8", classes=10)
    with pytest.raises(ConfigError, match=r"AB cannot connect stage 2: the student's 16x2x2 map"):
        ab_connector(StageInfo(16, 2, 2), StageInfo(32, 8, 8), 2)


def test_two_phases_through_the_protocol(pairs):
    """Init: student and connectors learn the AB loss, no CE; main: CE alone, the connectors get
    no gradient (frozen, as the reference leaves them out of its optimizer)."""
    d = pairs[("resnet32x4", "ShuffleV2")]
    d.train()
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in d.connectors.parameters())
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    assert {k.split(".")[0] for k in d.extra_state_dict()} == {"connectors", "momentum_primed"}
    d._momentum_primed = True  # the zero-weighted touch of the first step is tested in test_fsp.py
    for epoch, active, idle in ((30, "ab", "ce"), (31, "ce", "ab")):
        d.zero_grad(set_to_none=True)
        out = d(batch(), epoch)
        assert list(out.losses) == ["ce", "ab"] and out.losses[idle].item() == 0.0
        sum(out.losses.values()).backward()
        connectors_learn = all(p.grad is not None for p in d.connectors.parameters())
        head_learns = all(p.grad is not None for p in d.student.linear.parameters())
        assert (connectors_learn, head_learns) == ((True, False) if active == "ab" else (False, True))
        assert all(p.grad is not None for p in d.student.conv1.parameters())
        assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("ab")


@pytest.mark.slow
def test_trains_both_phases_end_to_end_through_the_engine(make_config, tmp_path):
    rows, _ = train_two_phases(make_config, tmp_path, {"name": "ab"})
    assert_phases(rows, {"ab"}, {"ce"})


# ------------------------------------------------------------------ configs and rows
def test_every_ab_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("ab", PUBLISHED, init_epochs=30):
        assert (cfg.method.ce_weight, cfg.method.ab_weight, cfg.method.margin) == (1.0, 1.0, 1.0)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("ab", PUBLISHED)
