"""RKD: the loss against the authors' code transcribed in float64, hand values, gradients and
extreme inputs; the pooled features on three CIFAR pairs; training through the method protocol
(teacher frozen); the refused pair; the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.losses.rkd import pairwise_distances, rkd_loss, rkd_terms

from featurekit import (build_pair, check_bf16_step_is_finite, check_cifar_rows, check_refuses_a_model_without_features,
                        cifar_configs, step_with_features, train_two_steps)

# PAPERS.md section 6: RKD top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 73.35, "wrn_40_2_wrn_40_1": 72.22, "resnet56_resnet20": 69.61,
    "resnet110_resnet20": 69.25, "resnet110_resnet32": 71.82, "resnet32x4_resnet8x4": 71.90,
    "vgg13_vgg8": 71.48, "vgg13_MobileNetV2": 64.52, "ResNet50_MobileNetV2": 64.43, "ResNet50_vgg8": 71.50,
    "resnet32x4_ShuffleV1": 72.28, "resnet32x4_ShuffleV2": 73.21, "wrn_40_2_ShuffleV1": 72.21,
}


# ------------------------------------------------------------------ the reference
class ReferenceRKD(nn.Module):
    """RepDistiller distiller_zoo/RKD.py, RKDLoss, verbatim (mdistiller distillers/RKD.py's
    rkd_loss is the same code with squared and eps as arguments)."""

    def __init__(self, w_d=25, w_a=50, squared=False, eps=1e-12):
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a
        self.squared, self.eps = squared, eps

    def forward(self, f_s, f_t):
        student = f_s.view(f_s.shape[0], -1)
        teacher = f_t.view(f_t.shape[0], -1)
        with torch.no_grad():
            t_d = self.pdist(teacher, squared=self.squared, eps=self.eps)
            mean_td = t_d[t_d > 0].mean()
            t_d = t_d / mean_td
        d = self.pdist(student, squared=self.squared, eps=self.eps)
        mean_d = d[d > 0].mean()
        d = d / mean_d
        loss_d = F.smooth_l1_loss(d, t_d)
        with torch.no_grad():
            td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        sd = (student.unsqueeze(0) - student.unsqueeze(1))
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        loss_a = F.smooth_l1_loss(s_angle, t_angle)
        return self.w_d * loss_d + self.w_a * loss_a

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        if not squared:
            res = res.sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 7), ds=st.integers(1, 6), dt=st.integers(1, 6), seed=st.integers(0, 2**16),
       scale=st.floats(0.05, 20), squared=st.booleans(), spatial=st.booleans())
def test_loss_and_gradients_equal_the_reference(n, ds, dt, seed, scale, squared, spatial):
    g = torch.Generator().manual_seed(seed)
    shape_s = (n, ds, 2, 1) if spatial else (n, ds)  # any trailing shape is flattened
    fs = (torch.randn(*shape_s, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    ft = torch.randn(n, dt, generator=g, dtype=torch.float64) * 3
    ref_s = fs.detach().clone().requires_grad_(True)
    expected = ReferenceRKD(squared=squared)(ref_s, ft)
    value = rkd_loss(fs, ft, squared=squared)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(value, fs)
    (ref_grad,) = torch.autograd.grad(expected, ref_s)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
    # The weights scale the two terms, and both terms vanish when the student is the teacher.
    terms = rkd_terms(fs, ft, squared=squared)
    torch.testing.assert_close(rkd_loss(fs, ft, 2.0, 3.0, squared), 2 * terms.distance + 3 * terms.angle)
    same = rkd_terms(ft, ft)
    assert same.distance.item() == pytest.approx(0, abs=1e-12) and same.angle.item() == pytest.approx(0, abs=1e-12)


def test_by_hand():
    # Teacher: a right isosceles triangle, student: the same triangle scaled by 2. Normalised
    # distances and angles are scale-free, so both losses are 0.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    terms = rkd_terms(2 * t, t)
    assert terms.distance.item() == pytest.approx(0, abs=1e-12) and terms.angle.item() == pytest.approx(0, abs=1e-12)
    d = pairwise_distances(t)
    torch.testing.assert_close(d, torch.tensor([[0, 1, 1], [1, 0, 2 ** 0.5], [1, 2 ** 0.5, 0]], dtype=torch.float64))
    # Student on a line: 0, 1, 2. Teacher normalised distances: (1, 1, sqrt2) / mean; student:
    # (1, 2, 1) / (4/3). Smooth L1 over the 9 entries (diagonal 0 on both sides).
    s = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    mt = (2 + 2 ** 0.5) / 3
    pairs_t = [1 / mt, 1 / mt, 2 ** 0.5 / mt]  # (0,1), (0,2), (1,2)
    pairs_s = [3 / 4, 6 / 4, 3 / 4]

    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    expected = 2 * sum(huber(a - b) for a, b in zip(pairs_s, pairs_t)) / 9
    assert rkd_terms(s, t).distance.item() == pytest.approx(expected, rel=1e-12)
    # Angles of the collinear student: at the middle point the two others are opposite (cos -1),
    # at an end point they are on the same side (cos 1); the triangle has cos 0 at its right
    # angle and cos sqrt(1/2) at the two others.
    angles_s = torch.tensor([[[0, 0, 0], [0, 1, 1], [0, 1, 1]], [[1, 0, -1], [0, 0, 0], [-1, 0, 1]],
                             [[1, 1, 0], [1, 1, 0], [0, 0, 0]]], dtype=torch.float64)
    r = 2 ** -0.5
    angles_t = torch.tensor([[[0, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, r], [0, 0, 0], [r, 0, 1]],
                             [[1, r, 0], [r, 1, 0], [0, 0, 0]]], dtype=torch.float64)
    expected_angle = F.smooth_l1_loss(angles_s.flatten(), angles_t.flatten())
    assert rkd_terms(s, t).angle.item() == pytest.approx(expected_angle.item(), rel=1e-12)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, ft.detach()), (fs,))
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, ft.detach(), squared=True), (fs,))
    rkd_loss(fs, ft).backward()
    assert ft.grad is None  # the teacher is a constant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_for_extreme_and_degenerate_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(8, 16, generator=g) * 1e4).to(dtype)  # squares overflow float16
    value = rkd_loss(big, big.flip(0))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    fs = big.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = rkd_loss(fs, big.float() + 1)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(fs.grad).all()
    # Identical samples (every distance at the clamp), one sample (no pair): finite, gradients too.
    for s in (torch.ones(4, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)):
        value = rkd_loss(s, torch.randn(len(s), 5))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert rkd_loss(torch.randn(1, 3), torch.randn(1, 5)).item() == 0.0


def test_refuses_batches_of_different_sizes():
    with pytest.raises(ValueError, match="same batch size"):
        rkd_loss(torch.randn(4, 3), torch.randn(5, 3))


# ------------------------------------------------------------------ the method
@pytest.mark.parametrize("teacher, student, dims", [
    ("resnet32x4", "resnet8x4", (256, 256)), ("resnet32x4", "ShuffleV2", (256, 1024)),
    ("vgg13", "MobileNetV2", (512, 1280)),
])
def test_the_reference_features_on_three_pairs(teacher, student, dims):
    """RepDistiller feeds feat[-1] (mdistiller pooled_feat): the pooled vector of each network,
    here of the widths those codes give; the loss term is the reference loss of those."""
    d = build_pair("rkd", teacher, student)
    assert d.needs_teacher_features and not list(d.extra_state_dict())  # no connector
    out, sf, tf = step_with_features(d, 4)
    assert (tf.pooled.shape[1], sf.pooled.shape[1]) == dims
    # In float32, as the reference runs (the Gram-matrix distances of near-identical random-input
    # features cancel to about 1e-4 of float64's value, in either code).
    torch.testing.assert_close(out.losses["rkd"], ReferenceRKD()(sf.pooled, tf.pooled))
    assert out.stats["rkd_distance"] >= 0 and out.stats["rkd_angle"] >= 0


def test_trains_through_the_protocol_with_the_teacher_frozen():
    d = build_pair("rkd", "resnet8", "resnet8", classes=10, rkd_weight=2.0, distance_weight=1.0, angle_weight=3.0)
    out = train_two_steps(d, {"ce", "rkd"}, classes=10)[0]
    torch.testing.assert_close(out.losses["rkd"], 2.0 * (out.stats["rkd_distance"] + 3.0 * out.stats["rkd_angle"]))


def test_refuses_a_pair_without_features():
    check_refuses_a_model_without_features("rkd")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("rkd")


# ------------------------------------------------------------------ configs and rows
def test_every_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("rkd", PUBLISHED):
        m = cfg.method
        assert (m.ce_weight, m.rkd_weight, m.distance_weight, m.angle_weight, m.squared, m.eps) == (
            1.0, 1.0, 25.0, 50.0, False, 1e-12)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("rkd", PUBLISHED)
