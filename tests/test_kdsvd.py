"""KDSVD: the loss and its gradients against mdistiller's code transcribed in float64 (equal once the
teacher's singular-vector signs, which the reference leaves to LAPACK, follow kdlab's convention);
the SVD's sign convention and safe gradient; the stages on three CIFAR pairs (one served, two
refused as mdistiller cannot run them); training through the protocol; configs and rows."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.errors import ConfigError
from kdlab.losses.kdsvd import align_to_teacher, kdsvd_loss, top_right_singular_vectors

from featurekit import (CRD_PAIRS, build_pair, check_bf16_step_is_finite, check_cifar_rows,
                        check_refuses_a_model_without_features, cifar_configs, step_with_features, train_two_steps)

# The CRD-table pairs whose stages have equal widths stage by stage: the ones KDSVD can run (no
# published number for any, PAPERS.md section 6).
SERVED = {"wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20",
          "resnet110_resnet32", "resnet32x4_resnet8x4", "vgg13_vgg8"}


# ------------------------------------------------------------------ the reference
# mdistiller mdistiller/distillers/KDSVD.py, kdsvd_loss / svd / removenan / align_rsv, verbatim, with
# the svd function as an argument so that a test can fix the signs of the teacher's vectors.
def ref_kdsvd_loss(g_s, g_t, k, svd_t=None):
    svd_t = svd_t or svd
    v_sb = None
    v_tb = None
    losses = []
    for i, f_s, f_t in zip(range(len(g_s)), g_s, g_t):
        u_t, s_t, v_t = svd_t(f_t, k, i)
        u_s, s_s, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            l2loss = (s_rbf - t_rbf.detach()).pow(2)
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            losses.append(l2loss.sum())
        v_tb = v_t
        v_sb = v_s
    bsz = g_s[0].shape[0]
    losses = [l / bsz for l in losses]
    return sum(losses)


def svd(feat, n=1, *_):
    size = feat.shape
    assert len(size) == 4
    x = feat.view(size[0], size[1] * size[2], size[3]).float() if feat.dtype != torch.float64 else \
        feat.view(size[0], size[1] * size[2], size[3])  # the reference's .float(), kept float64 here
    u, s, v = torch.svd(x)
    u = removenan(u)
    s = removenan(s)
    v = removenan(v)
    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)
    return u, s, v


def removenan(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def align_rsv(a, b):
    cosine = torch.matmul(a.transpose(-2, -1), b)
    max_abs_cosine, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
    mask = torch.where(torch.eq(max_abs_cosine, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
    a = torch.matmul(a, mask)
    return a, b


def teacher_svd_with_signs(flips=None):
    """The reference's svd for the teacher, each vector's largest-magnitude entry made positive
    (kdlab's convention), then multiplied by flips[stage] (all +1 by default)."""
    def run(feat, n, stage):
        u, s, v = svd(feat, n)
        peak = v.abs().argmax(dim=1, keepdim=True)
        v = v * torch.where(v.gather(1, peak) < 0, -1.0, 1.0)
        return u, s, v * (flips[stage] if flips else 1.0)
    return run


def random_stages(n, widths, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cs = torch.randint(1, 6, (len(widths),), generator=g).tolist()
    ct = torch.randint(1, 6, (len(widths),), generator=g).tolist()
    fs = [(torch.randn(n, c, w, w, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
          for c, w in zip(cs, widths)]
    ft = [torch.relu(torch.randn(n, c, w, w, generator=g, dtype=torch.float64)) for c, w in zip(ct, widths)]
    return fs, ft


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), widths=st.lists(st.sampled_from([2, 3, 4, 6]), min_size=2, max_size=3),
       seed=st.integers(0, 2**16), k=st.integers(1, 2))
def test_loss_and_gradients_equal_the_reference(n, widths, seed, k):
    fs, ft = random_stages(n, widths, seed)
    value = kdsvd_loss(fs, ft, k)
    ref_s = [f.detach().clone().requires_grad_(True) for f in fs]
    expected = ref_kdsvd_loss(ref_s, ft, k, teacher_svd_with_signs())
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(value, fs)
    ref_grads = torch.autograd.grad(expected, ref_s)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if k == 1:
        # The verbatim reference (signs as LAPACK returns them) gives, sample by sample, the value
        # of one choice of the teacher's signs: the convention is the only difference.
        for b in range(n):
            s_b, t_b = [f[b:b + 1] for f in fs], [f[b:b + 1] for f in ft]
            verbatim = ref_kdsvd_loss(s_b, t_b, 1).item()
            choices = [ref_kdsvd_loss(s_b, t_b, 1, teacher_svd_with_signs(list(f))).item()
                       for f in itertools.product([1.0, -1.0], repeat=len(widths))]
            assert min(abs(verbatim - c) for c in choices) <= 1e-9 * max(1.0, abs(verbatim))


def test_singular_vectors_sign_convention_and_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    v, s = top_right_singular_vectors(x, 2)
    _, s_ref, vh_ref = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:, :2])
    torch.testing.assert_close(v.abs(), vh_ref.mT[:, :, :2].abs())
    peak = v.abs().argmax(1, keepdim=True)
    assert (v.gather(1, peak) > 0).all()
    # The same vectors for the negated matrix (the SVD's sign is a free choice, ours is not).
    torch.testing.assert_close(top_right_singular_vectors(-x, 2)[0], v)
    # A request beyond the width gives the width's vectors.
    assert top_right_singular_vectors(x, 7)[0].shape == (3, 4, 4)


def test_gradient_check():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: top_right_singular_vectors(m, 2)[0], (x,))
    fs, ft = random_stages(2, [4, 2], 3)
    assert torch.autograd.gradcheck(lambda a, b: kdsvd_loss([a, b], ft), tuple(fs))


def test_finite_gradients_where_the_reference_svd_gives_nan():
    # A zero student map: exactly repeated (zero) singular values whatever the LAPACK. (A map of
    # ones, used before, gave rounding-distinct singular values on some CPUs, and the reference
    # stayed finite there.)
    g = torch.Generator().manual_seed(0)
    fs = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    fs2 = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    ft = [torch.rand(2, 5, 4, 4, dtype=torch.float64, generator=g), torch.rand(2, 5, 2, 2, dtype=torch.float64, generator=g)]
    value = kdsvd_loss([fs, fs2], ft)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(fs.grad).all() and torch.isfinite(fs2.grad).all()
    ref = [fs.detach().clone().requires_grad_(True), fs2.detach().clone().requires_grad_(True)]
    ref_kdsvd_loss(ref, ft, 1).backward()
    assert not torch.isfinite(ref[0].grad).all()  # what the guard is for


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_for_extreme_inputs_and_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    fs = [(torch.randn(2, 4, w, w, generator=g) * 1e4).to(dtype) for w in (4, 2)]
    ft = [torch.zeros(2, 3, 4, 4, dtype=dtype), torch.full((2, 3, 2, 2), float("nan"), dtype=dtype)]
    value = kdsvd_loss(fs, ft)  # a zero teacher map and a non-finite one
    assert value.dtype == torch.float32 and torch.isfinite(value)
    xs = [f.float().requires_grad_(True) for f in fs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = kdsvd_loss(xs, [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_alignment_picks_the_most_parallel_student_vector_with_its_sign():
    student = torch.eye(3)[None]  # e1, e2, e3
    teacher = torch.tensor([[0.1], [-0.9], [0.2]])[None]
    torch.testing.assert_close(align_to_teacher(student, teacher), torch.tensor([[[0.0], [-1.0], [0.0]]]))


def test_refuses_unequal_widths():
    with pytest.raises(ValueError, match="equal map widths"):
        kdsvd_loss([torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 4, 4)] * 2)


# ------------------------------------------------------------------ the method
def test_the_reference_stages_on_the_served_pair():
    """ResNet32x4 -> ResNet8x4: mdistiller's feats[1:] (kdlab raw_stages), all three zipped."""
    d = build_pair("kdsvd", "resnet32x4", "resnet8x4")
    assert d.needs_teacher_features and not list(d.extra_state_dict())  # nothing but the student trains
    out, sf, tf = step_with_features(d, 2)
    assert [f.shape[-1] for f in sf.raw_stages] == [f.shape[-1] for f in tf.raw_stages] == [32, 16, 8]
    expected = ref_kdsvd_loss([f.double() for f in sf.raw_stages], [f.double() for f in tf.raw_stages], 1,
                              teacher_svd_with_signs())
    torch.testing.assert_close(out.losses["kdsvd"].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher, student, widths", [
    ("resnet32x4", "ShuffleV2", "stage 1: 16 vs 32, stage 2: 8 vs 16, stage 3: 4 vs 8"),
    ("vgg13", "MobileNetV2", "stage 1: 16 vs 16, stage 2: 8 vs 8, stage 3: 4 vs 4, stage 4: 2 vs 4"),
])
def test_refuses_pairs_whose_widths_differ(teacher, student, widths):
    with pytest.raises(ConfigError, match="method kdsvd cannot distil .*" + widths):
        build_pair("kdsvd", teacher, student)


def test_refuses_a_pair_without_features():
    check_refuses_a_model_without_features("kdsvd")


def test_trains_through_the_protocol_with_the_teacher_frozen():
    d = build_pair("kdsvd", "resnet8", "resnet8", classes=10, kdsvd_weight=2.0)
    out = train_two_steps(d, {"ce", "kdsvd"}, classes=10)[0]
    torch.testing.assert_close(out.losses["kdsvd"], 2.0 * out.stats["kdsvd"])
    assert out.stats["kdsvd"] > 0


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("kdsvd")


# ------------------------------------------------------------------ configs and rows
def test_configs_for_every_pair_kdsvd_can_run():
    for cfg in cifar_configs("kdsvd", SERVED):
        assert (cfg.method.ce_weight, cfg.method.kdsvd_weight, cfg.method.k) == (1.0, 1.0, 1)


@pytest.mark.slow  # builds the 13 pairs (a few seconds)
def test_the_other_pairs_of_the_crd_table_are_refused():
    for pair in sorted(set(CRD_PAIRS) - SERVED):
        teacher, student = next((t, s) for t in ("resnet32x4", "wrn_40_2", "vgg13", "ResNet50")
                                for s in ("ShuffleV1", "ShuffleV2", "MobileNetV2", "vgg8") if f"{t}_{s}" == pair)
        with pytest.raises(ConfigError, match="widths differ"):
            build_pair("kdsvd", teacher, student)


def test_reproduce_rows_have_no_published_number():
    check_cifar_rows("kdsvd", dict.fromkeys(SERVED))
