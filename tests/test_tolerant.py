"""Tolerant teachers: the patriarch's losses (TSD, tolerant CE+TSD, label smoothing, confidence
penalty), the `tolerant` and `generation` methods, and the secondary-information metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.methods.base import Batch
from kdlab.analysis.secondary import (
    chance_in_group,
    class_similarity,
    in_group_mass,
    resolve_groups,
    secondary_metrics,
    similarity_rank_corr,
    top_secondary_in_group,
)
from kdlab.config import load_config
from kdlab.errors import ConfigError
from kdlab.losses import (
    confidence_penalty_loss,
    cross_entropy,
    kd_loss,
    label_smoothing_loss,
    prediction_entropy,
    tolerant_teacher_loss,
    tsd_loss,
)
from kdlab.losses.tolerant import tolerant_optimum
from kdlab.methods import method_class

FAST = settings(max_examples=25, deadline=None)
LOGITS = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0, 5.0]])


# ----------------------------------------------------------------------------- TSD: values
def test_tsd_hand_computed_target_and_top1():
    y = torch.tensor([0])
    # primary = ground truth 3; the 2 highest others are 5 and 2 -> 3 - 3.5
    assert tsd_loss(LOGITS, y, k=3).item() == pytest.approx(-0.5)
    # primary = top-1 (5); the 2 highest others are 3 and 2 -> 5 - 2.5
    assert tsd_loss(LOGITS, y, k=3, primary="top1").item() == pytest.approx(2.5)
    # k = 2: only the single highest other class
    assert tsd_loss(LOGITS, y, k=2).item() == pytest.approx(3.0 - 5.0)
    # k = C: every other class: 3 - (1 + 2 + 0 - 1 + 5) / 5
    assert tsd_loss(LOGITS, y, k=6).item() == pytest.approx(3.0 - 7.0 / 5)


def test_tsd_probability_scores_and_batch_mean():
    y = torch.tensor([0])
    p = [math.exp(v) for v in LOGITS[0].tolist()]
    p = [v / sum(p) for v in p]
    expected = p[0] - (p[5] + p[2]) / 2
    assert tsd_loss(LOGITS, y, k=3, scores="probabilities").item() == pytest.approx(expected, rel=1e-6)
    batch = torch.cat([LOGITS, LOGITS])
    ys = torch.tensor([0, 5])
    assert tsd_loss(batch, ys, k=3).item() == pytest.approx((-0.5 + 2.5) / 2)
    per = tsd_loss(batch, ys, k=3, reduction="none")
    assert per.tolist() == pytest.approx([-0.5, 2.5])


def test_tolerant_teacher_loss_hand_computed():
    y = torch.tensor([0])
    ce = -LOGITS[0, 0].item() + math.log(sum(math.exp(v) for v in LOGITS[0].tolist()))
    got = tolerant_teacher_loss(LOGITS, y, eta=0.6, k=3).item()
    assert got == pytest.approx(0.6 * ce + 0.4 * (-0.5), rel=1e-6)


@FAST
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 6))
def test_eta_one_is_plain_cross_entropy(seed, c, n):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    k = min(5, c)
    torch.testing.assert_close(tolerant_teacher_loss(z, y, eta=1.0, k=k), F.cross_entropy(z, y))


@FAST
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(0, 4))
def test_tsd_gradient_is_plus_one_on_primary_minus_mean_on_secondaries(seed, k, extra):
    c = k + extra
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(1, c, generator=g) * 2).requires_grad_()
    y = torch.randint(0, c, (1,), generator=g)
    tsd_loss(z, y, k=k).backward()
    grad = z.grad[0]
    others = [i for i in range(c) if i != y.item()]
    top = sorted(others, key=lambda i: -z[0, i].item())[: k - 1]
    expected = torch.zeros(c)
    expected[y.item()] = 1.0
    expected[top] = -1.0 / (k - 1)
    torch.testing.assert_close(grad, expected)


@settings(max_examples=12, deadline=None)
@given(st.floats(0.55, 0.95), st.integers(2, 5), st.integers(0, 5), st.integers(0, 1000))
def test_free_logits_converge_to_the_stated_optimum(eta, k, extra, seed):
    """PAPERS.md: for one sample with free logits the logit form is minimised at
    p_t = (2 eta - 1) / eta, secondaries (1 - eta) / (eta (K - 1)), others 0."""
    c = k + extra
    g = torch.Generator().manual_seed(seed)
    n = 8  # 8 independent samples optimised at once (the loss is a batch mean: scale by n)
    z = torch.randn(n, c, generator=g).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    opt = torch.optim.SGD([z], lr=2.0)
    for _ in range(800):
        opt.zero_grad()
        (tolerant_teacher_loss(z, y, eta=eta, k=k) * n).backward()
        opt.step()
    p = z.detach().double().softmax(1)
    p_t = p.gather(1, y[:, None]).squeeze(1)
    rest = p.scatter(1, y[:, None], -1.0).sort(1, descending=True).values
    want_t, want_s = tolerant_optimum(eta, k)
    assert want_t == pytest.approx((2 * eta - 1) / eta)
    assert torch.allclose(p_t, torch.full_like(p_t, want_t), atol=5e-3)
    assert torch.allclose(rest[:, : k - 1], torch.full_like(rest[:, : k - 1], want_s), atol=5e-3)
    if extra:
        assert rest[:, k - 1:].max().item() < 5e-3


def test_logit_form_is_unbounded_below_for_eta_half_or_less():
    # Why the error exists: at eta = 0.4 pushing the target logit down lowers the loss forever.
    z = torch.tensor([[0.0, 1.0, 1.0]])
    y = torch.tensor([0])
    losses = []
    for shift in (0.0, -10.0, -100.0):
        zz = z.clone()
        zz[0, 0] += shift
        ce = F.cross_entropy(zz, y)
        losses.append((0.4 * ce + 0.6 * tsd_loss(zz, y, k=2)).item())
    assert losses[0] > losses[1] > losses[2]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("eta", [0.5, 0.3, 0.0, 1.2])
def test_eta_outside_half_one_is_refused_for_logits(eta):
    with pytest.raises(ValueError, match=r"eta=.*outside \(0.5, 1\]"):
        tolerant_teacher_loss(LOGITS, torch.tensor([0]), eta=eta)


def test_probability_scores_accept_eta_below_half():
    value = tolerant_teacher_loss(LOGITS, torch.tensor([0]), eta=0.3, k=3, scores="probabilities")
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match=r"outside \(0.0, 1\]"):
        tolerant_teacher_loss(LOGITS, torch.tensor([0]), eta=0.0, scores="probabilities")


@pytest.mark.parametrize("k", [1, 0, 7])
def test_k_below_two_or_above_classes_is_refused(k):
    with pytest.raises(ValueError, match="k="):
        tsd_loss(LOGITS, torch.tensor([0]), k=k)
    with pytest.raises(ValueError, match="k="):
        tolerant_teacher_loss(LOGITS, torch.tensor([0]), eta=1.0, k=k)


def test_config_errors_name_the_key(make_config):
    with pytest.raises(ConfigError, match=r"method\.eta: .*0\.5 < eta <= 1"):
        load_config(data=make_config(method={"name": "tolerant", "eta": 0.5, "scores": "logits"}))
    with pytest.raises(ConfigError, match=r"method\.k"):
        load_config(data=make_config(method={"name": "tolerant", "k": 1}))
    with pytest.raises(ConfigError, match=r"method\.lam"):
        load_config(data=make_config(method={"name": "generation", "lam": 1.5},
                                     teacher={"name": "resnet8", "checkpoint": "x.pt"}))
    # eta only matters for kind tsd
    ok = load_config(data=make_config(method={"name": "tolerant", "kind": "strict", "eta": 0.3}))
    assert ok.method.kind == "strict"


def test_k_larger_than_dataset_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method\.k=11 .* 10 classes"):
        method_class("tolerant")(nn.Linear(4, 10), None, method_class("tolerant").Config(k=11), num_classes=10)


# ----------------------------------------------------------------------------- alternatives
def test_confidence_penalty_hand_computed():
    c = 7
    z = torch.zeros(3, c)  # uniform: CE = H = ln C
    y = torch.tensor([0, 3, 6])
    assert confidence_penalty_loss(z, y, beta=0.25).item() == pytest.approx(0.75 * math.log(c), rel=1e-6)
    assert prediction_entropy(z).item() == pytest.approx(math.log(c), rel=1e-6)
    z2 = torch.tensor([[2.0, 0.0]])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    h = -sum(v * math.log(v) for v in p)
    assert confidence_penalty_loss(z2, torch.tensor([1]), beta=0.5).item() == pytest.approx(-math.log(p[1]) - 0.5 * h, rel=1e-6)


@FAST
@given(st.integers(0, 10_000), st.floats(0.0, 0.5))
def test_confidence_penalty_and_label_smoothing_reduce_to_ce(seed, eps):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, 6, generator=g) * 3
    y = torch.randint(0, 6, (5,), generator=g)
    torch.testing.assert_close(confidence_penalty_loss(z, y, beta=0.0), F.cross_entropy(z, y))
    log_p = z.log_softmax(1)
    smoothed = (1 - eps) * F.nll_loss(log_p, y) + eps * (-log_p.mean(1)).mean()
    torch.testing.assert_close(label_smoothing_loss(z, y, eps), smoothed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(label_smoothing_loss(z, y, eps), cross_entropy(z, y, eps))


def test_softer_patriarch_losses_lower_the_optimal_confidence():
    """Each alternative, optimised on free logits, ends less peaked than strict CE would."""
    y = torch.tensor([0])
    finals = {}
    for name, fn in {
        "tsd": lambda z: tolerant_teacher_loss(z, y, eta=0.6, k=3),
        "ls": lambda z: label_smoothing_loss(z, y, 0.2),
        "cp": lambda z: confidence_penalty_loss(z, y, beta=0.5),
    }.items():
        z = torch.zeros(1, 5, requires_grad=True)
        opt = torch.optim.SGD([z], lr=1.0)
        for _ in range(400):
            opt.zero_grad()
            fn(z).backward()
            opt.step()
        finals[name] = z.detach().softmax(1)[0, 0].item()
    assert finals["tsd"] == pytest.approx(1 / 0.6 * 0.2, abs=5e-3)  # (2*0.6-1)/0.6
    assert finals["ls"] == pytest.approx(0.8 + 0.2 / 5, abs=5e-3)  # optimum of smoothed CE
    assert 0.2 < finals["cp"] < 0.95


# ----------------------------------------------------------------------------- methods
class Fixed(nn.Module):
    """A 'network' that returns given logits (plus a parameter so it is trainable)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + self.w


class Exploding(nn.Module):
    def forward(self, x):  # pragma: no cover - must not be called
        raise AssertionError("teacher must not run")


def _cfg(name, **kw):
    return method_class(name).Config(**kw)


@pytest.mark.parametrize("kind,fn,terms", [
    ("strict", lambda z, y: F.cross_entropy(z, y), {"ce"}),
    ("tsd", lambda z, y: tolerant_teacher_loss(z, y, 0.7, 3, scores="probabilities"), {"ce", "tsd"}),
    ("label_smoothing", lambda z, y: label_smoothing_loss(z, y, 0.2), {"ce"}),
    ("confidence_penalty", lambda z, y: confidence_penalty_loss(z, y, 0.3), {"ce", "entropy"}),
])
def test_tolerant_method_terms_sum_to_the_pure_loss(kind, fn, terms):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g) * 2
    y = torch.randint(0, 5, (6,), generator=g)
    cfg = _cfg("tolerant", kind=kind, eta=0.7, k=3, smoothing=0.2, penalty=0.3)
    m = method_class("tolerant")(Fixed(z), None, cfg, num_classes=5)
    out = m.forward_train(Batch(torch.zeros(6, 1), y), 1)
    assert set(out.losses) == terms
    torch.testing.assert_close(sum(out.losses.values()), fn(z, y))
    assert out.stats["target_conf"].item() == pytest.approx(z.softmax(1).gather(1, y[:, None]).mean().item())
    assert method_class("tolerant").requires_teacher is False


def test_generation_method_loss_and_lambda_zero_skips_teacher():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 3
    y = torch.randint(0, 6, (4,), generator=g)
    m = method_class("generation")(Fixed(zs), Fixed(zt), _cfg("generation", lam=0.6, tau=2.0), num_classes=6)
    out = m.forward_train(Batch(torch.zeros(4, 1), y), 1)
    expected = 0.4 * F.cross_entropy(zs, y) + 0.6 * kd_loss(zs, zt, 2.0)
    torch.testing.assert_close(sum(out.losses.values()), expected)
    assert out.stats["teacher_conf"].item() == pytest.approx(zt.softmax(1).gather(1, y[:, None]).mean().item())
    m0 = method_class("generation")(Fixed(zs), Exploding(), _cfg("generation", lam=0.0), num_classes=6)
    out0 = m0.forward_train(Batch(torch.zeros(4, 1), y), 1)
    torch.testing.assert_close(sum(out0.losses.values()), F.cross_entropy(zs, y))


# ----------------------------------------------------------------------------- secondary metrics
GROUPS = [0, 0, 1, 1, 2, 2]  # three groups of two classes


def test_secondary_metrics_hand_computed():
    probs = np.array([
        [0.5, 0.3, 0.1, 0.1, 0.0, 0.0],  # target 0: in-group 0.3 of 0.5 non-target
        [0.1, 0.4, 0.2, 0.1, 0.1, 0.1],  # target 1: in-group 0.1 of 0.6
    ])
    y = np.array([0, 1])
    assert in_group_mass(probs, y, GROUPS) == pytest.approx((0.6 + 0.1 / 0.6) / 2)
    # k = 2: the single top secondary: class 1 (in group) for row 0, class 2 (out) for row 1
    assert top_secondary_in_group(probs, y, GROUPS, k=2) == pytest.approx(0.5)
    # k = 3: row 0 -> {1, 2 or 3}: 1 of 2 in group; row 1 -> {2, and one 0.1 tie}: class 0 is
    # in group only if picked, so use distinct values instead
    probs2 = np.array([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0]])
    assert top_secondary_in_group(probs2, np.array([0]), GROUPS, k=3) == pytest.approx(0.5)
    assert chance_in_group(GROUPS) == pytest.approx(1 / 5)


def test_uniform_predictions_sit_at_chance_and_semantic_ones_at_the_top():
    c = len(GROUPS)
    y = np.repeat(np.arange(c), 3)
    uniform = np.full((len(y), c), 1.0 / c)
    assert in_group_mass(uniform, y, GROUPS) == pytest.approx(chance_in_group(GROUPS, y))
    semantic = np.full((len(y), c), 0.01)
    for i, t in enumerate(y):
        mate = t ^ 1  # the other class of its group
        semantic[i, t], semantic[i, mate] = 0.7, 0.26
    semantic /= semantic.sum(1, keepdims=True)
    assert in_group_mass(semantic, y, GROUPS) > 0.8
    assert top_secondary_in_group(semantic, y, GROUPS, k=2) == 1.0
    assert similarity_rank_corr(semantic, y, GROUPS) > 0.9
    rng = np.random.default_rng(0)
    noise = rng.dirichlet(np.ones(c), size=len(y))
    assert abs(similarity_rank_corr(noise, y, GROUPS)) < similarity_rank_corr(semantic, y, GROUPS)
    m = secondary_metrics(semantic, y, GROUPS, k=2)
    assert set(m) == {"in_group_mass", "top_secondary_in_group", "similarity_rank_corr", "in_group_chance"}


@FAST
@given(st.integers(0, 10_000), st.permutations([0, 1, 2]))
def test_metrics_are_bounded_and_ignore_group_ids(seed, perm):
    rng = np.random.default_rng(seed)
    c = len(GROUPS)
    y = rng.integers(0, c, size=12)
    probs = rng.dirichlet(np.full(c, 0.5), size=12)
    renamed = [perm[g] for g in GROUPS]
    for fn in (in_group_mass, lambda p, t, g: top_secondary_in_group(p, t, g, 3)):
        value = fn(probs, y, GROUPS)
        assert 0.0 <= value <= 1.0
        assert fn(probs, y, renamed) == pytest.approx(value)
    rho = similarity_rank_corr(probs, y, GROUPS)
    assert math.isnan(rho) or -1.0 <= rho <= 1.0


def test_class_similarity_is_symmetric_mean_of_non_target_distributions():
    probs = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
    sim = class_similarity(probs, np.array([0, 1]), 3)
    np.testing.assert_allclose(sim, sim.T)
    assert sim[0, 1] == pytest.approx((0.5 + 0.5) / 2)  # row 0: 0.25/0.5; row 1: 0.2/0.4
    assert np.isnan(sim[2, 2])  # class 2 has no samples


def test_ungrouped_classes_are_left_out():
    probs = np.array([[0.4, 0.3, 0.3], [0.3, 0.4, 0.3]])
    assert math.isnan(in_group_mass(probs, np.array([2, 2]), [0, 0, -1]))
    assert in_group_mass(probs, np.array([0, 1]), [0, 0, -1]) == pytest.approx(0.5)


def test_resolve_groups_forms_and_errors(tmp_path):
    names = ["cat", "dog", "car", "truck"]
    assert resolve_groups([0, 0, 1, 1], names) == [0, 0, 1, 1]
    assert resolve_groups({"animals": ["cat", "dog"], "vehicles": ["car", 3]}, names) == [0, 0, 1, 1]
    assert resolve_groups({"animals": ["cat", "dog"]}, names) == [0, 0, -1, -1]
    f = tmp_path / "groups.yaml"
    f.write_text("animals: [cat, dog]\nvehicles: [car, truck]\n")
    assert resolve_groups(str(f), names) == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="4 classes"):
        resolve_groups([0, 1], names)
    with pytest.raises(ConfigError, match="unknown class 'horse'"):
        resolve_groups({"animals": ["horse"]}, names)
    with pytest.raises(ConfigError, match="two groups"):
        resolve_groups({"a": ["cat"], "b": ["cat"]}, names)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_groups(str(tmp_path / "nope.yaml"), names)
