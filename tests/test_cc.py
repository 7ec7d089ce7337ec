"""CC: the loss and its gradients against RepDistiller's `Correlation` transcribed in float64, hand
values, extreme inputs; the embeddings on three CIFAR pairs; training through the protocol (both
embeddings trained, teacher frozen); the refused pair; the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.losses.cc import cc_loss

from featurekit import (build_pair, check_bf16_step_is_finite, check_cifar_rows, check_refuses_a_model_without_features,
                        cifar_configs, step_with_features, train_two_steps)

# PAPERS.md section 6: CC top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 73.56, "wrn_40_2_wrn_40_1": 72.21, "resnet56_resnet20": 69.63,
    "resnet110_resnet20": 69.48, "resnet110_resnet32": 71.48, "resnet32x4_resnet8x4": 72.97,
    "vgg13_vgg8": 70.71, "vgg13_MobileNetV2": 64.86, "ResNet50_MobileNetV2": 65.43, "ResNet50_vgg8": 70.25,
    "resnet32x4_ShuffleV1": 71.14, "resnet32x4_ShuffleV2": 71.29, "wrn_40_2_ShuffleV1": 71.38,
}


# ------------------------------------------------------------------ the reference
class ReferenceCorrelation(nn.Module):
    """RepDistiller distiller_zoo/CC.py, Correlation, verbatim."""

    def forward(self, f_s, f_t):
        delta = torch.abs(f_s - f_t)
        loss = torch.mean((delta[:-1] * delta[1:]).sum(1))
        return loss


class ReferenceLinearEmbed(nn.Module):
    """RepDistiller models/util.py, LinearEmbed, verbatim."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        return x


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), d=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.floats(0.01, 50))
def test_loss_and_gradients_equal_the_reference(n, d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    fs = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    ft = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    rs, rt = fs.detach().clone().requires_grad_(True), ft.detach().clone().requires_grad_(True)
    value, expected = cc_loss(fs, ft), ReferenceCorrelation()(rs, rt)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    value.backward()
    expected.backward()
    torch.testing.assert_close(fs.grad, rs.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ft.grad, rt.grad, rtol=1e-12, atol=1e-12)  # the teacher's embedding learns
    assert cc_loss(ft, ft).item() == 0.0


def test_by_hand():
    # delta rows (1, 2), (3, 0), (1, 1): pairs (0,1) -> 3, (1,2) -> 3; mean over the 2 pairs = 3.
    fs = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    assert cc_loss(fs, torch.zeros_like(fs)).item() == 3.0
    assert cc_loss(-fs, torch.zeros_like(fs)).item() == 3.0  # absolute differences
    assert cc_loss(fs[:1], torch.zeros(1, 2)).item() == 0.0  # one sample: no pair


def test_gradient_check():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cc_loss, (fs, ft))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_for_extreme_inputs(dtype):
    fs = torch.full((4, 8), 1000.0, dtype=dtype)  # products (1e6) overflow float16
    value = cc_loss(fs, -fs)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(8 * 2000.0 ** 2)
    x = (torch.randn(4, 8) * 1e3).requires_grad_(True)
    embed = nn.Linear(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = cc_loss(embed(x), embed(torch.randn(4, 8)))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"one \(N, D\) shape"):
        cc_loss(torch.zeros(4, 3), torch.zeros(4, 5))


# ------------------------------------------------------------------ the method
@pytest.mark.parametrize("teacher, student, dims", [
    ("resnet32x4", "resnet8x4", (256, 256)), ("resnet32x4", "ShuffleV2", (256, 1024)),
    ("vgg13", "MobileNetV2", (512, 1280)),
])
def test_the_reference_embeddings_on_three_pairs(teacher, student, dims):
    """RepDistiller: LinearEmbed(feat[-1].shape[1], 128) for each network, Correlation of the two."""
    d = build_pair("cc", teacher, student)
    assert (d.embed_t.in_features, d.embed_s.in_features) == dims
    assert d.embed_s.out_features == d.embed_t.out_features == 128 and d.embed_s.bias is not None
    assert set(d.extra_state_dict()) == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    ref_s, ref_t = ReferenceLinearEmbed(dims[1]).double(), ReferenceLinearEmbed(dims[0]).double()
    ref_s.linear.load_state_dict(d.embed_s.state_dict())
    ref_t.linear.load_state_dict(d.embed_t.state_dict())
    out, sf, tf = step_with_features(d, 4)
    with torch.no_grad():
        expected = 0.02 * ReferenceCorrelation()(ref_s(sf.pooled.double()), ref_t(tf.pooled.double()))
    torch.testing.assert_close(out.losses["cc"].double(), expected, rtol=1e-5, atol=1e-7)


def test_trains_through_the_protocol_with_the_teacher_frozen():
    d = build_pair("cc", "resnet8", "resnet8", classes=10, feat_dim=16)
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in [*d.embed_s.parameters(), *d.embed_t.parameters()])
    before = {k: v.clone() for k, v in d.extra_state_dict().items()}
    out = train_two_steps(d, {"ce", "cc"}, classes=10)[0]
    torch.testing.assert_close(out.losses["cc"], 0.02 * out.stats["cc"])
    after = d.extra_state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before)  # both embeddings learn


def test_refuses_a_pair_without_features():
    check_refuses_a_model_without_features("cc")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("cc")


# ------------------------------------------------------------------ configs and rows
def test_every_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("cc", PUBLISHED):
        assert (cfg.method.ce_weight, cfg.method.cc_weight, cfg.method.feat_dim) == (1.0, 0.02, 128)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("cc", PUBLISHED)
