"""NST: the loss and its gradients equal to the reference code in float64, the reference's
stages on three CIFAR pairs, training through the method protocol (teacher frozen), the
refused pairs, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.errors import ConfigError
from kdlab.losses.nst import nst_loss
from kdlab.methods.base import Batch
from kdlab.models import create_model

from featurekit import (THREE_PAIRS, build, check_bf16_step_is_finite, check_cifar_configs, check_cifar_rows,
                        check_trains_end_to_end, check_trains_with_the_teacher_frozen,
                        check_wrn_uses_the_raw_residual_sums, cifar_models, features)

# PAPERS.md section 6: NST top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 73.68, "wrn_40_2_wrn_40_1": 72.24, "resnet56_resnet20": 69.60,
    "resnet110_resnet20": 69.53, "resnet110_resnet32": 71.96, "resnet32x4_resnet8x4": 73.30, "vgg13_vgg8": 71.53,
    "vgg13_MobileNetV2": 58.16, "ResNet50_MobileNetV2": 64.96, "ResNet50_vgg8": 71.28,
    "resnet32x4_ShuffleV1": 74.12, "resnet32x4_ShuffleV2": 74.68, "wrn_40_2_ShuffleV1": 74.89,
}


# ------------------------------------------------------------------ the reference, transcribed
def poly_kernel(a, b):
    a = a.unsqueeze(1)
    b = b.unsqueeze(2)
    res = (a * b).sum(-1).pow(2)
    return res


def reference_nst_loss(f_s, f_t):
    """RepDistiller distiller_zoo/NST.py, `NSTLoss.nst_loss` with full_loss = True (mdistiller
    distillers/NST.py, `single_stage_nst_loss`, is the same code)."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
    f_s = F.normalize(f_s, dim=2)
    f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
    f_t = F.normalize(f_t, dim=2)

    return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
            - 2 * poly_kernel(f_s, f_t).mean())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), cs=st.integers(1, 6), ct=st.integers(1, 6), hs=st.sampled_from([1, 2, 4, 8]),
       ht=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16), relu=st.booleans())
def test_loss_and_gradient_equal_the_reference(n, cs, ct, hs, ht, seed, relu):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, cs, hs, hs, generator=g, dtype=torch.float64)
    ft = torch.randn(n, ct, ht, ht, generator=g, dtype=torch.float64)
    if relu:
        fs, ft = fs.relu(), ft.relu()
    fs.requires_grad_(True)
    value = nst_loss(fs, ft)
    expected = reference_nst_loss(fs, ft)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(value, fs)
    (expected_grad,) = torch.autograd.grad(expected, fs)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)


def test_loss_by_hand():
    # One channel each over two positions: patterns [1, 0] and [0, 1]: k = 1 on the diagonals,
    # 0 across -> MMD^2 = 1 + 1 - 0 = 2. The same pattern on both sides -> 0.
    fs = torch.tensor([[[[2.0, 0.0]]]])
    ft = torch.tensor([[[[0.0, 5.0]]]])
    assert nst_loss(fs, ft).item() == pytest.approx(2.0)
    assert nst_loss(fs, 3 * fs).item() == pytest.approx(0.0, abs=1e-12)
    # Two student channels [1, 0] and [0, 1], one teacher channel [1, 0]:
    # student term mean(1, 0, 0, 1) = 1/2, teacher 1, cross mean(1, 0) = 1/2 -> 1/2 + 1 - 1.
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    ft = torch.tensor([[[[1.0, 0.0]]]])
    assert nst_loss(fs, ft).item() == pytest.approx(0.5)
    # A 2x2 map averaged to the 1x1 teacher map: every pattern is [1] -> 0.
    assert nst_loss(torch.rand(2, 3, 2, 2) + 0.1, torch.rand(2, 4, 1, 1) + 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: nst_loss(s, ft), (fs,))
    nst_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_float32_for_extreme_half_precision_maps(dtype):
    fs = torch.full((2, 3, 4, 4), 6.0e4, dtype=dtype)  # squared norms overflow float16
    fs[:, 0] = 0.0  # an all-zero channel: F.normalize's clamp, no 0/0
    value = nst_loss(fs, torch.randn(2, 5, 8, 8).to(dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = nst_loss(torch.randn(2, 3, 4, 4) * 1e3, torch.randn(2, 6, 4, 4))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch sizes differ"):
        nst_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


# ------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def models():
    return cifar_models()


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_every_stage_of_the_reference_on_three_pairs(models, teacher, student):
    """RepDistiller feat[1:-1] (the stage shapes of each pair are checked in test_at.py: AT and
    NST pair the same tensors)."""
    d = build("nst", models[student], models[teacher])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = d.forward_train(Batch(images, torch.tensor([1, 2])), 1)
    tf, sf = features(d, images)
    assert d.teacher_indices == d.student_indices == list(range(len(tf.raw_stages))) == list(range(len(sf.raw_stages)))
    expected = sum(reference_nst_loss(s.double(), t.double()) for s, t in zip(sf.raw_stages, tf.raw_stages))
    torch.testing.assert_close(out.losses["nst"].double(), 50.0 * expected, rtol=1e-4, atol=1e-6)


def test_wrn_uses_the_raw_residual_sums():
    check_wrn_uses_the_raw_residual_sums("nst", reference_nst_loss, "nst_loss")


def test_trains_through_the_protocol_with_the_teacher_frozen():
    torch.manual_seed(0)  # chosen stages; no connector: the MMD compares channel sets of any size
    d = build("nst", create_model("resnet8", 10), create_model("resnet14", 10), classes=10,
              student_stages=[2, 3], teacher_stages=[2, 3])
    assert (d.student_indices, d.teacher_indices) == ([1, 2], [1, 2])
    check_trains_with_the_teacher_frozen(d, "nst")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("nst")


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    check_trains_end_to_end("nst", "nst", 50.0, make_config, tmp_path)


def test_refuses_pairs_it_cannot_serve():
    resnet8 = create_model("resnet8", 10)
    with pytest.raises(ConfigError, match=r"NST pairs .* 4 student stages with 3 teacher stages"):
        build("nst", create_model("vgg8", 10), resnet8)
    with pytest.raises(ConfigError, match=r"student_stages=\[\] is not a non-empty list of the student's stages"):
        build("nst", create_model("resnet8", 10), resnet8, student_stages=[], teacher_stages=[])


# ------------------------------------------------------------------ configs and rows
def test_every_nst_config_loads_with_the_reference_settings():
    check_cifar_configs("nst", PUBLISHED, {"ce_weight": 1.0, "nst_weight": 50.0, "student_stages": None,
                                           "teacher_stages": None})


def test_reproduce_rows_carry_the_published_numbers():
    assert len(check_cifar_rows("nst", PUBLISHED)) == len(PUBLISHED)
