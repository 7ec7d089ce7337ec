"""VID: the loss and its gradients (regressor, variance, student map) against the authors' code
transcribed in float64; the stages and regressor shapes on three CIFAR pairs; training through the
protocol (regressors and variances trained, teacher frozen); mdistiller's fixed variance; the
refused pair; the shipped configs and the reproduce rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.losses.vid import initial_log_scale, match_spatial, vid_nll, vid_variance
from kdlab.methods.vid import VIDHead

from featurekit import (build_pair, check_bf16_step_is_finite, check_cifar_rows, check_refuses_a_model_without_features,
                        cifar_configs, step_with_features, train_teacher_then, train_two_steps)

# PAPERS.md section 6: VID top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 74.11, "wrn_40_2_wrn_40_1": 73.30, "resnet56_resnet20": 70.38,
    "resnet110_resnet20": 70.16, "resnet110_resnet32": 72.61, "resnet32x4_resnet8x4": 73.09,
    "vgg13_vgg8": 71.23, "vgg13_MobileNetV2": 65.56, "ResNet50_MobileNetV2": 67.57, "ResNet50_vgg8": 70.30,
    "resnet32x4_ShuffleV1": 73.38, "resnet32x4_ShuffleV2": 73.40, "wrn_40_2_ShuffleV1": 73.61,
}


# ------------------------------------------------------------------ the reference
class ReferenceVIDLoss(nn.Module):
    """RepDistiller distiller_zoo/VID.py, VIDLoss, verbatim (mdistiller distillers/VID.py's vid_loss
    is the same computation)."""

    def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False, stride=stride)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_target_channels),
        )
        self.log_scale = torch.nn.Parameter(
            np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels)
        )
        self.eps = eps

    def forward(self, input, target):
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        else:
            pass
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        loss = torch.mean(neg_log_prob)
        return loss


def twin_reference(head: VIDHead) -> ReferenceVIDLoss:
    """The reference module with the kdlab head's weights, in float64."""
    conv = head.regressor[0]
    ref = ReferenceVIDLoss(conv.in_channels, conv.out_channels, conv.out_channels).double()
    ref.regressor.load_state_dict(head.regressor.state_dict())
    with torch.no_grad():
        ref.log_scale.copy_(head.log_scale)
    return ref


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), cs=st.integers(1, 5), ct=st.integers(1, 5), hs=st.sampled_from([2, 4, 8]),
       ht=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16), init=st.floats(0.5, 10))
def test_loss_and_gradients_equal_the_reference(n, cs, ct, hs, ht, seed, init):
    torch.manual_seed(seed)
    head = VIDHead(cs, ct, initial_log_scale(init), learn=True).double()
    with torch.no_grad():  # a spread of variances, not all at the initial one
        head.log_scale.add_(torch.randn(ct, dtype=torch.float64))
    ref = twin_reference(head)
    fs = torch.randn(n, cs, hs, hs, dtype=torch.float64, requires_grad=True)
    ft = torch.relu(torch.randn(n, ct, ht, ht, dtype=torch.float64)) * 3
    ref_s = fs.detach().clone().requires_grad_(True)
    value, expected = head(fs, ft, 1e-5), ref(ref_s, ft)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    value.backward()
    expected.backward()
    torch.testing.assert_close(fs.grad, ref_s.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.log_scale.grad, ref.log_scale.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip(head.regressor.parameters(), ref.regressor.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_by_hand():
    # softplus(alpha) + eps = 5 at the initial alpha; the reference's numpy formula gives the same.
    alpha = initial_log_scale(5.0, 1e-5)
    assert alpha == pytest.approx(np.log(np.exp(5.0 - 1e-5) - 1.0), rel=1e-15)
    assert vid_variance(torch.tensor([alpha], dtype=torch.float64)).item() == pytest.approx(5.0, rel=1e-14)
    # One channel of variance 2 (eps 0): errors 1 and 3 over two elements.
    log_scale = torch.tensor([np.log(np.expm1(2.0))], dtype=torch.float64)
    mu = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 1, 1, 2)
    expected = np.mean([0.5 * (1 / 2 + np.log(2)), 0.5 * (9 / 2 + np.log(2))])
    assert vid_nll(mu, torch.zeros_like(mu), log_scale, eps=0.0).item() == pytest.approx(expected, rel=1e-14)
    # The larger map is pooled: a 4x4 student map against a 2x2 teacher map, and the reverse.
    s, t = match_spatial(torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))
    torch.testing.assert_close(s, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    s, t = match_spatial(torch.zeros(1, 1, 2, 2), torch.arange(16.0).view(1, 1, 4, 4))
    assert t.shape == (1, 1, 2, 2) and s.shape == (1, 1, 2, 2)


def test_gradient_check_and_constant_teacher():
    torch.manual_seed(0)
    mu = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, a: vid_nll(m, t.detach(), a), (mu, alpha))
    vid_nll(mu, t, alpha).backward()
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_for_extreme_inputs(dtype):
    mu = torch.full((2, 3, 4, 4), 1000.0, dtype=dtype)  # squared errors (1e6) overflow float16
    alpha = torch.tensor([-50.0, 0.0, 200.0])  # variance at the eps floor; exp(200) overflows float32
    value = vid_nll(mu, torch.zeros_like(mu), alpha)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    head = VIDHead(3, 3, initial_log_scale(), learn=True)
    x = (torch.randn(2, 3, 4, 4) * 1e4).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = head(x, torch.randn(2, 3, 2, 2) * 1e4, 1e-5)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.log_scale.grad).all()


def test_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one log-scale per channel"):
        vid_nll(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(4))


# ------------------------------------------------------------------ the method
# RepDistiller's VIDLoss(s, t, t) for every (student, teacher) pair of feat[1:-1], zipped.
REFERENCE_CHANNELS = {
    ("resnet32x4", "resnet8x4"): [(64, 64), (128, 128), (256, 256)],
    ("resnet32x4", "ShuffleV2"): [(116, 64), (232, 128), (464, 256)],
    ("vgg13", "MobileNetV2"): [(12, 128), (16, 256), (48, 512), (160, 512)],
}


@pytest.mark.parametrize("teacher, student", list(REFERENCE_CHANNELS))
def test_the_reference_stages_and_regressors_on_three_pairs(teacher, student):
    d = build_pair("vid", teacher, student)
    shapes = [(h.regressor[0].in_channels, h.regressor[0].out_channels) for h in d.heads]
    assert shapes == REFERENCE_CHANNELS[(teacher, student)]
    for h in d.heads:
        c = h.regressor[0].out_channels
        assert [type(m) for m in h.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
        assert all(m.kernel_size == (1, 1) and m.bias is None for m in h.regressor[::2])
        assert (h.regressor[2].in_channels, h.regressor[4].out_channels) == (c, c)
        torch.testing.assert_close(vid_variance(h.log_scale.detach()), torch.full((c,), 5.0))
    # The loss term is the sum of the reference losses over the zipped raw stages.
    out, sf, tf = step_with_features(d, 2)
    with torch.no_grad():
        expected = sum(twin_reference(h)(s.double(), t.double())
                       for h, s, t in zip(d.heads, sf.raw_stages, tf.raw_stages))
    torch.testing.assert_close(out.losses["vid"].double(), expected, rtol=1e-5, atol=1e-5)


def test_unequal_stage_counts_pair_from_the_first_stage():
    d = build_pair("vid", "vgg13", "resnet8x4")  # 4 teacher stages, 3 student stages: RepDistiller's zip
    assert [(h.regressor[0].in_channels, h.regressor[0].out_channels) for h in d.heads] == [
        (64, 128), (128, 256), (256, 512)]


def test_trains_through_the_protocol_with_the_teacher_frozen():
    d = build_pair("vid", "resnet8", "resnet8", classes=10)
    alpha_before = [h.log_scale.detach().clone() for h in d.heads]
    regressor_before = [h.regressor[0].weight.detach().clone() for h in d.heads]
    assert all(k.startswith("heads.") for k in d.extra_state_dict()) and len(d.heads) == 3
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in d.heads.parameters())
    out = train_two_steps(d, {"ce", "vid"}, classes=10)[0]
    torch.testing.assert_close(out.losses["vid"], out.stats["vid_nll"])
    assert out.stats["vid_variance"].item() == pytest.approx(5.0, rel=1e-5)
    assert all(not torch.equal(h.log_scale, a) for h, a in zip(d.heads, alpha_before))  # learned variance
    assert all(not torch.equal(h.regressor[0].weight, w) for h, w in zip(d.heads, regressor_before))


def test_mdistillers_fixed_variance():
    d = build_pair("vid", "resnet8", "resnet8", classes=10, learn_variance=False)
    assert all(not isinstance(h.log_scale, nn.Parameter) for h in d.heads)
    assert any(k.endswith("log_scale") for k in d.extra_state_dict())  # still checkpointed
    train_two_steps(d, {"ce", "vid"}, classes=10)
    for h in d.heads:
        torch.testing.assert_close(vid_variance(h.log_scale), torch.full_like(h.log_scale, 5.0))


def test_refuses_a_pair_without_features():
    check_refuses_a_model_without_features("vid")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("vid")


# ------------------------------------------------------------------ configs and rows
def test_every_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("vid", PUBLISHED):
        m = cfg.method
        assert (m.ce_weight, m.vid_weight, m.init_variance, m.eps, m.learn_variance) == (1.0, 1.0, 5.0, 1e-5, True)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("vid", PUBLISHED)


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    """`kdlab train` with method vid: the term is logged and the regressors and variances are
    checkpointed."""
    from kdlab.engine.checkpoint import Checkpoint  # lazy: only this test reads a checkpoint

    rows, run = train_teacher_then({"name": "vid"}, make_config, tmp_path)
    row = rows[-1]
    assert row["train/vid"] == pytest.approx(row["stat/vid_nll"]) and row["stat/vid_variance"] < 5.0
    extra = Checkpoint.load(run / "last.pt").extra_state
    assert {k.split(".")[-1] for k in extra} == {"weight", "log_scale"}
    assert sum(k.endswith("log_scale") for k in extra) == 3
