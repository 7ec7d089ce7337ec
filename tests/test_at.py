"""AT: the loss and its gradients equal to the reference code in float64, the reference's
stages on three CIFAR pairs, training through the method protocol (teacher frozen), the
refused pairs, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.config import load_config
from kdlab.errors import ConfigError
from kdlab.losses.at import at_loss, attention_map
from kdlab.methods.base import Batch
from kdlab.models import create_model

from featurekit import (ROOT, THREE_PAIRS, Plain, build, check_bf16_step_is_finite, check_cifar_configs,
                        check_cifar_rows, check_trains_end_to_end, check_trains_with_the_teacher_frozen,
                        check_wrn_uses_the_raw_residual_sums, cifar_models, features)

# PAPERS.md section 6: AT top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 74.08, "wrn_40_2_wrn_40_1": 72.77, "resnet56_resnet20": 70.55,
    "resnet110_resnet20": 70.22, "resnet110_resnet32": 72.31, "resnet32x4_resnet8x4": 73.44, "vgg13_vgg8": 71.43,
    "vgg13_MobileNetV2": 59.40, "ResNet50_MobileNetV2": 58.58, "ResNet50_vgg8": 71.84,
    "resnet32x4_ShuffleV1": 71.73, "resnet32x4_ShuffleV2": 72.73, "wrn_40_2_ShuffleV1": 73.32,
}


# ------------------------------------------------------------------ the reference, transcribed
def reference_at_loss(f_s, f_t, p=2):
    """RepDistiller distiller_zoo/AT.py, `Attention.at_loss` (mdistiller distillers/AT.py,
    `single_stage_at_loss`, is the same code)."""
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return (at(f_s) - at(f_t)).pow(2).mean()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), cs=st.integers(1, 5), ct=st.integers(1, 5), hs=st.sampled_from([1, 2, 4, 8]),
       ht=st.sampled_from([1, 2, 4, 8]), p=st.sampled_from([1.0, 2.0, 3.0, 4.0]), seed=st.integers(0, 2**16))
def test_loss_and_gradient_equal_the_reference(n, cs, ct, hs, ht, p, seed):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, cs, hs, hs, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(n, ct, ht, ht, generator=g, dtype=torch.float64)
    value = at_loss(fs, ft, p)
    expected = reference_at_loss(fs, ft.detach(), p)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(value, fs)
    (expected_grad,) = torch.autograd.grad(expected, fs)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_loss_by_hand():
    # One channel, two positions: attention maps [1, 0] and [0, 1]; squared differences 1 and 1.
    fs = torch.tensor([[[[3.0, 0.0]]]])
    ft = torch.tensor([[[[0.0, -2.0]]]])
    assert at_loss(fs, ft).item() == pytest.approx(1.0)
    # Channel mean of squares: (1 + 9) / 2 and (4 + 0) / 2 -> normalised [5, 2] / sqrt(29).
    torch.testing.assert_close(attention_map(torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])),
                               torch.tensor([[5.0, 2.0]]) / 29**0.5)
    # A 2x2 student map is averaged to the teacher's 1x1 map: every unit map equals [1].
    assert at_loss(torch.rand(2, 3, 2, 2) + 0.1, torch.rand(2, 5, 1, 1) + 0.1).item() == pytest.approx(0.0, abs=1e-12)
    # Scale does not matter: the maps are normalised.
    f = torch.randn(2, 3, 4, 4)
    assert at_loss(7.0 * f, f).item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: at_loss(s, ft), (fs,))
    at_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_float32_for_extreme_half_precision_maps(dtype):
    fs = torch.full((2, 3, 4, 4), 6.0e4, dtype=dtype)  # squares overflow float16
    fs[:, :, 0, 0] = 1.0
    value = at_loss(fs, torch.ones(2, 3, 4, 4, dtype=dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = at_loss(torch.randn(2, 3, 4, 4) * 1e3, torch.randn(2, 3, 8, 8))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    zeros = at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))  # F.normalize's eps: no 0/0
    assert zeros.item() == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch sizes differ"):
        at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        at_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# ------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def models():
    return cifar_models()


# The reference's feat[1:-1] of each pair (RepDistiller model code): (channels, size) of the stages.
REFERENCE_STAGES = {
    ("resnet32x4", "resnet8x4"): ([(64, 32), (128, 16), (256, 8)], [(64, 32), (128, 16), (256, 8)]),
    ("resnet32x4", "ShuffleV2"): ([(64, 32), (128, 16), (256, 8)], [(116, 16), (232, 8), (464, 4)]),
    ("vgg13", "MobileNetV2"): ([(128, 16), (256, 8), (512, 4), (512, 4)], [(12, 16), (16, 8), (48, 4), (160, 2)]),
}


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_every_stage_of_the_reference_on_three_pairs(models, teacher, student):
    d = build("at", models[student], models[teacher])
    t_stages, s_stages = REFERENCE_STAGES[(teacher, student)]
    assert d.teacher_indices == d.student_indices == list(range(len(t_stages)))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = d.forward_train(Batch(images, torch.tensor([1, 2])), 1)
    tf, sf = features(d, images)
    assert [(f.shape[1], f.shape[2]) for f in tf.raw_stages] == t_stages
    assert [(f.shape[1], f.shape[2]) for f in sf.raw_stages] == s_stages
    expected = sum(reference_at_loss(s.double(), t.double()) for s, t in zip(sf.raw_stages, tf.raw_stages))
    torch.testing.assert_close(out.losses["at"].double(), 1000.0 * expected, rtol=1e-4, atol=1e-7)


def test_wrn_uses_the_raw_residual_sums():
    """The references' WRN feats are the blocks' raw outputs (before the next BN-ReLU)."""
    check_wrn_uses_the_raw_residual_sums("at", reference_at_loss, "at_loss")


def test_chosen_stages_pair_in_order(models):
    d = build("at", models["MobileNetV2"], models["vgg13"], student_stages=[2, 3, 4], teacher_stages=[1, 2, 3])
    assert (d.student_indices, d.teacher_indices) == ([1, 2, 3], [0, 1, 2])


def test_trains_through_the_protocol_with_the_teacher_frozen():
    torch.manual_seed(0)  # no connector: the maps compare across channel counts
    check_trains_with_the_teacher_frozen(build("at", create_model("resnet8", 10), create_model("resnet14", 10),
                                               classes=10), "at")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("at")


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    check_trains_end_to_end("at", "at", 1000.0, make_config, tmp_path)


def test_refuses_pairs_it_cannot_serve():
    resnet8 = create_model("resnet8", 10)
    with pytest.raises(ConfigError, match=r"AT pairs .* 3 student stages with 4 teacher stages .*student_stages"):
        build("at", resnet8, create_model("vgg8", 10))
    with pytest.raises(ConfigError, match=r"teacher_stages=\[5\] is not a non-empty list of the teacher's stages.*1\.\.3"):
        build("at", resnet8, create_model("resnet8", 10), teacher_stages=[5], student_stages=[1])
    with pytest.raises(ConfigError, match=r"does not accept model\(x, features=True\)"):
        build("at", Plain(), resnet8)


# ------------------------------------------------------------------ configs and rows
def test_every_at_config_loads_with_the_reference_settings():
    check_cifar_configs("at", PUBLISHED, {"ce_weight": 1.0, "at_weight": 1000.0, "p": 2.0,
                                          "student_stages": None, "teacher_stages": None})


def test_imagenet_configs_follow_mdistiller():
    r18 = load_config(ROOT / "configs" / "imagenet" / "at" / "resnet34_resnet18.yaml")
    mv1 = load_config(ROOT / "configs" / "imagenet" / "at" / "resnet50_MobileNetV1.yaml")
    for cfg in (r18, mv1):
        assert (cfg.method.ce_weight, cfg.method.at_weight, cfg.method.p) == (1.0, 1000.0, 2.0)
        assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.epochs) == (0.2, 512, 100)
    assert r18.method.student_stages is None and r18.method.teacher_stages is None
    # mdistiller zips ResNet50 feats[1:] (4 stages) with MobileNetV1 feats[1:] (its stages 2-4).
    assert (mv1.method.student_stages, mv1.method.teacher_stages) == ([2, 3, 4], [1, 2, 3])


def test_reproduce_rows_carry_the_published_numbers():
    rows = check_cifar_rows("at", PUBLISHED)
    imagenet = {i: r for i, r in rows.items() if r.dataset == "imagenet"}
    assert set(imagenet) == {"at/imagenet/resnet34_resnet18", "at/imagenet/resnet50_MobileNetV1"}
    assert all(r.published is None and (ROOT / r.config).is_file() for r in imagenet.values())
    assert len(rows) == len(PUBLISHED) + 2
