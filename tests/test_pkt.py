"""PKT: the loss and its gradients equal to the reference code in float64, the reference's
pooled features on three CIFAR pairs, training through the method protocol (teacher frozen),
the refused inputs, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.errors import ConfigError
from kdlab.losses.pkt import cosine_conditional_probabilities, pkt_loss
from kdlab.methods.base import Batch
from kdlab.models import create_model

from featurekit import (THREE_PAIRS, Plain, build, check_bf16_step_is_finite, check_cifar_configs,
                        check_cifar_rows, check_trains_end_to_end, check_trains_with_the_teacher_frozen,
                        cifar_models, features)

# PAPERS.md section 6: PKT top-1 on CIFAR-100 (the CRD benchmark, RepDistiller README @ b84f547).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 74.54, "wrn_40_2_wrn_40_1": 73.45, "resnet56_resnet20": 70.34,
    "resnet110_resnet20": 70.25, "resnet110_resnet32": 72.61, "resnet32x4_resnet8x4": 73.64, "vgg13_vgg8": 72.88,
    "vgg13_MobileNetV2": 67.13, "ResNet50_MobileNetV2": 66.52, "ResNet50_vgg8": 73.01,
    "resnet32x4_ShuffleV1": 74.10, "resnet32x4_ShuffleV2": 74.69, "wrn_40_2_ShuffleV1": 73.89,
}


# ------------------------------------------------------------------ the reference, transcribed
def reference_pkt_loss(output_net, target_net, eps=0.0000001):
    """RepDistiller distiller_zoo/PKT.py, `PKT.cosine_similarity_loss` (mdistiller
    distillers/PKT.py, `pkt_loss`, is the same code)."""
    # Normalize each vector by its norm
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0

    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0

    # Calculate the cosine similarity
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))

    # Scale cosine similarity to 0..1
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0

    # Transform them into probabilities
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)

    # Calculate the KL-divergence
    loss = torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))

    return loss


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), ds=st.integers(2, 16), dt=st.integers(1, 16), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 100), relu=st.booleans())
def test_loss_and_gradient_equal_the_reference(n, ds, dt, seed, scale, relu):
    g = torch.Generator().manual_seed(seed)
    fs = scale * torch.randn(n, ds, generator=g, dtype=torch.float64)
    ft = torch.randn(n, dt, generator=g, dtype=torch.float64)
    if relu:  # pooled features after a ReLU, as most networks give them
        fs, ft = fs.relu(), ft.relu()
    fs.requires_grad_(True)
    value = pkt_loss(fs, ft)
    expected = reference_pkt_loss(fs * 1.0, ft.clone())  # the reference writes into its inputs
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(value, fs)
    (expected_grad,) = torch.autograd.grad(expected, fs)
    finite = torch.isfinite(expected_grad)  # the reference's sqrt gives NaN for an all-zero vector
    # (Student vectors of 2 or more features: with one, the normalised values are +-1 and the
    # gradient, of order eps / x^2, is pure rounding of nearly equal terms.)
    torch.testing.assert_close(grad[finite], expected_grad[finite], rtol=1e-10, atol=1e-14)
    assert torch.isfinite(grad).all()


def test_probabilities_and_loss_by_hand():
    # Orthogonal, equal and opposite vectors: cosines 0, 1, -1 -> kernel 1/2, 1, 0.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_conditional_probabilities(x, eps=0.0), k / k.sum(1, keepdim=True))
    assert pkt_loss(x, x).item() == pytest.approx(0.0, abs=1e-15)
    # Student all collinear: q = 1/3 everywhere; loss = mean p log((p + eps) / (1/3 + eps)).
    p = k / k.sum(1, keepdim=True)
    eps = 1e-7
    expected = (p * torch.log((p + eps) / (1 / 3 + eps))).mean()
    # (rel 1e-5: the loss also adds eps to each norm, which this hand value leaves out)
    assert pkt_loss(torch.ones(3, 2, dtype=torch.float64), x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, ft), (fs,))
    pkt_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_float32_for_extreme_half_precision_features(dtype):
    fs = torch.full((4, 64), 6.0e4, dtype=dtype)  # squared norms overflow float16
    fs[0] = 0.0  # an all-zero vector: value 0 after normalisation, finite gradient
    fs = fs.requires_grad_(True)
    value = pkt_loss(fs, torch.randn(4, 32).to(dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(fs.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = pkt_loss(torch.randn(4, 64) * 1e3, torch.randn(4, 16))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch sizes differ"):
        pkt_loss(torch.zeros(2, 3), torch.zeros(3, 3))


# ------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def models():
    return cifar_models()


# The reference's feat[-1] (RepDistiller model code): the pooled vector's size, teacher and student.
REFERENCE_POOLED = {
    ("resnet32x4", "resnet8x4"): (256, 256),
    ("resnet32x4", "ShuffleV2"): (256, 1024),  # ShuffleV2's after its final 1x1 conv
    ("vgg13", "MobileNetV2"): (512, 1280),  # MobileNetV2's after its final 1x1 conv
}


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_the_pooled_features_of_the_reference_on_three_pairs(models, teacher, student):
    d = build("pkt", models[student], models[teacher])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = d.forward_train(Batch(images, torch.tensor([1, 2, 3])), 1)
    tf, sf = features(d, images)
    assert (tf.pooled.shape[1], sf.pooled.shape[1]) == REFERENCE_POOLED[(teacher, student)]
    head = d.teacher.fc if hasattr(d.teacher, "fc") else d.teacher.classifier
    torch.testing.assert_close(head(tf.pooled), d.teacher(images), rtol=1e-4, atol=1e-5)  # what the head reads
    # The step's value is the loss of exactly these vectors; in float64 it is the reference's
    # (float32 is not compared with float64 here: the pooled vectors of untrained networks are
    # nearly collinear, every p is close to 1/b and the divergence is a cancellation).
    torch.testing.assert_close(out.losses["pkt"], 30000.0 * pkt_loss(sf.pooled, tf.pooled))
    torch.testing.assert_close(pkt_loss(sf.pooled.double(), tf.pooled.double()),
                               reference_pkt_loss(sf.pooled.double(), tf.pooled.double()), rtol=1e-8, atol=0)


def test_trains_through_the_protocol_with_the_teacher_frozen():
    torch.manual_seed(0)  # no connector: b x b probabilities compare across sizes
    check_trains_with_the_teacher_frozen(build("pkt", create_model("resnet8", 10), create_model("resnet14", 10),
                                               classes=10), "pkt")


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("pkt")


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    check_trains_end_to_end("pkt", "pkt", 30000.0, make_config, tmp_path)


def test_refuses_a_model_without_features():
    for student, teacher in ((Plain(), create_model("resnet8", 10)), (create_model("resnet8", 10), Plain())):
        with pytest.raises(ConfigError, match=r"does not accept model\(x, features=True\)"):
            build("pkt", student, teacher)


# ------------------------------------------------------------------ configs and rows
def test_every_pkt_config_loads_with_the_reference_settings():
    check_cifar_configs("pkt", PUBLISHED, {"ce_weight": 1.0, "pkt_weight": 30000.0})


def test_reproduce_rows_carry_the_published_numbers():
    assert len(check_cifar_rows("pkt", PUBLISHED)) == len(PUBLISHED)
