"""SP: the loss and its gradients equal to the reference code in float64, the reference's
stage on three CIFAR pairs, training through the method protocol (teacher frozen), the
refused inputs, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.errors import ConfigError
from kdlab.losses.sp import similarity_matrix, sp_loss
from kdlab.methods.base import Batch
from kdlab.models import create_model

from featurekit import (THREE_PAIRS, Plain, build, check_bf16_step_is_finite, check_cifar_configs,
                        check_cifar_rows, check_trains_end_to_end, check_trains_with_the_teacher_frozen,
                        check_wrn_uses_the_raw_residual_sums, cifar_models, features)

# PAPERS.md section 6: SP top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 73.83, "wrn_40_2_wrn_40_1": 72.43, "resnet56_resnet20": 69.67,
    "resnet110_resnet20": 70.04, "resnet110_resnet32": 72.69, "resnet32x4_resnet8x4": 72.94, "vgg13_vgg8": 72.68,
    "vgg13_MobileNetV2": 66.30, "ResNet50_MobileNetV2": 68.08, "ResNet50_vgg8": 73.34,
    "resnet32x4_ShuffleV1": 73.48, "resnet32x4_ShuffleV2": 74.56, "wrn_40_2_ShuffleV1": 74.52,
}


# ------------------------------------------------------------------ the reference, transcribed
def reference_similarity_loss(f_s, f_t):
    """RepDistiller distiller_zoo/SP.py, `Similarity.similarity_loss` (mdistiller
    distillers/SP.py, `similarity_loss`, is the same code); it returns a (1,) tensor."""
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)

    G_s = torch.mm(f_s, torch.t(f_s))
    G_s = torch.nn.functional.normalize(G_s)
    G_t = torch.mm(f_t, torch.t(f_t))
    G_t = torch.nn.functional.normalize(G_t)

    G_diff = G_t - G_s
    loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
    return loss


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), s_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       t_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 100))
def test_loss_and_gradient_equal_the_reference(n, s_shape, t_shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    fs = (scale * torch.randn(n, *s_shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ft = torch.randn(n, *t_shape, generator=g, dtype=torch.float64)
    value = sp_loss(fs, ft)
    expected = reference_similarity_loss(fs, ft)
    assert value.shape == ()
    torch.testing.assert_close(value, expected[0], rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(value, fs)
    (expected_grad,) = torch.autograd.grad(expected.sum(), fs)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_loss_by_hand():
    # Two orthogonal unit samples: G = I for both sides -> 0. Teacher collinear: rows [1, 1]/sqrt 2.
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ft = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # G~ = [[1, 2], [2, 4]] -> rows [1, 2]/sqrt 5
    assert sp_loss(fs, fs).item() == 0.0
    torch.testing.assert_close(similarity_matrix(ft), torch.tensor([[1.0, 2.0], [1.0, 2.0]]) / 5**0.5)
    a, b = 1 / 5**0.5, 2 / 5**0.5
    expected = ((a - 1) ** 2 + b**2 + a**2 + (b - 1) ** 2) / 4
    assert sp_loss(fs, ft).item() == pytest.approx(expected)
    # Invariant to the scale of either side.
    f = torch.randn(4, 3, 2, 2)
    assert sp_loss(5.0 * f, f).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 5, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: sp_loss(s, ft), (fs,))
    sp_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_float32_for_extreme_half_precision_maps(dtype):
    fs = torch.full((4, 8, 4, 4), 6.0e4, dtype=dtype)  # Gram entries overflow float16
    fs[0] = 1.0
    value = sp_loss(fs, torch.randn(4, 8, 4, 4).to(dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sp_loss(torch.randn(4, 8, 4, 4) * 1e3, torch.randn(4, 3, 2, 2))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert sp_loss(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0  # normalize's clamp: no 0/0


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch sizes differ"):
        sp_loss(torch.zeros(2, 3), torch.zeros(3, 3))


# ------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def models():
    return cifar_models()


# The reference's feat[-2] (RepDistiller model code): (channels, size) of the last stage, teacher and student.
REFERENCE_STAGE = {
    ("resnet32x4", "resnet8x4"): ((256, 8), (256, 8)),
    ("resnet32x4", "ShuffleV2"): ((256, 8), (464, 4)),  # ShuffleV2's, before its final 1x1 conv to 1024
    ("vgg13", "MobileNetV2"): ((512, 4), (160, 2)),  # MobileNetV2's, before its final 1x1 conv to 1280
}


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_the_last_stage_of_the_reference_on_three_pairs(models, teacher, student):
    d = build("sp", models[student], models[teacher])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = d.forward_train(Batch(images, torch.tensor([1, 2, 3])), 1)
    tf, sf = features(d, images)
    ft, fs = tf.raw_stages[d.teacher_index], sf.raw_stages[d.student_index]
    assert ((ft.shape[1], ft.shape[2]), (fs.shape[1], fs.shape[2])) == REFERENCE_STAGE[(teacher, student)]
    assert (d.teacher_index, d.student_index) == (len(tf.raw_stages) - 1, len(sf.raw_stages) - 1)
    expected = reference_similarity_loss(fs.double(), ft.double())[0]
    torch.testing.assert_close(out.losses["sp"].double(), 3000.0 * expected, rtol=1e-4, atol=1e-7)


def test_wrn_uses_the_raw_residual_sum():
    """The references' WRN feats[-2] is block3's raw output, not relu(bn(.)) before pooling."""
    check_wrn_uses_the_raw_residual_sums("sp", lambda s, t: reference_similarity_loss(s, t)[0], "sp_loss",
                                         teacher="wrn_16_1", last_only=True, n=4)


def test_other_stages(models):
    d = build("sp", models["MobileNetV2"], models["vgg13"], student_stage=2, teacher_stage=1)
    assert (d.student_index, d.teacher_index) == (1, 0)


def test_trains_through_the_protocol_with_the_teacher_frozen():
    torch.manual_seed(0)  # no connector: b x b matrices compare across shapes
    check_trains_with_the_teacher_frozen(build("sp", create_model("resnet8", 10), create_model("resnet14", 10),
                                               classes=10), "sp")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("sp")


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    check_trains_end_to_end("sp", "sp", 3000.0, make_config, tmp_path)


def test_refuses_inputs_it_cannot_serve():
    resnet8 = create_model("resnet8", 10)
    with pytest.raises(ConfigError, match=r"teacher_stage=4 is not a stage of the teacher .*1\.\.3"):
        build("sp", resnet8, create_model("resnet8", 10), teacher_stage=4)
    with pytest.raises(ConfigError, match=r"does not accept model\(x, features=True\)"):
        build("sp", Plain(), resnet8)


# ------------------------------------------------------------------ configs and rows
def test_every_sp_config_loads_with_the_reference_settings():
    check_cifar_configs("sp", PUBLISHED, {"ce_weight": 1.0, "sp_weight": 3000.0, "student_stage": None,
                                          "teacher_stage": None})


def test_reproduce_rows_carry_the_published_numbers():
    assert len(check_cifar_rows("sp", PUBLISHED)) == len(PUBLISHED)
