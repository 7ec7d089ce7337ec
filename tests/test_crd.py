"""CRD: the NCE loss and the memory-bank arithmetic against the authors' formulation written out
sample by sample, gradient checks and extreme inputs; the method through the protocol (setup,
forward_train, memory updates of exactly the batch's rows, checkpointed state, determinism),
DDP with two processes, the shipped configs and the reproduce rows."""
from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.config import load_config
from kdlab.errors import CheckpointError, ConfigError, TrainingError
from kdlab.losses import (
    NCE_EPS,
    contrast_indices,
    contrast_logits,
    crd_nce_loss,
    init_memory,
    momentum_update,
    nce_log_normalizer,
    negative_pool,
)
from kdlab.methods import method_class
from kdlab.methods.base import Batch, SetupContext
from kdlab.methods.crd import CRD, first_occurrences
from kdlab.models import create_model

ROOT = Path(__file__).resolve().parents[1]

# PAPERS.md section 2 (same-architecture pairs, in the DKD table's order) and section 5.
PUBLISHED = {
    "resnet56_resnet20": 71.16, "resnet110_resnet32": 73.48, "resnet32x4_resnet8x4": 75.51,
    "wrn_40_2_wrn_16_2": 75.48, "wrn_40_2_wrn_40_1": 74.14, "vgg13_vgg8": 73.94,
    "resnet32x4_ShuffleV1": 75.11, "wrn_40_2_ShuffleV1": 76.05, "vgg13_MobileNetV2": 69.73,
    "ResNet50_MobileNetV2": 69.11, "resnet32x4_ShuffleV2": 75.65,
    # the CRD table's two pairs beyond the 11 of the DKD and ReviewKD tables (PAPERS.md section 6)
    "resnet110_resnet20": 71.46, "ResNet50_vgg8": 74.3,
}


# ------------------------------------------------------------------ the reference, written out
def reference_contrast_loss(scores: list[list[float]], z: float, n_data: int) -> float:
    """RepDistiller's ContrastMemory + ContrastLoss for one anchor side, one sample at a time
    in plain Python: P = exp(s) / Z, log D1 = log(P0 / (P0 + K Pn + eps)),
    log D0 = log(K Pn / (Pk + K Pn + eps)), loss = -(sum of all) / batch size."""
    total = 0.0
    for row in scores:
        k = len(row) - 1
        noise = k * (1.0 / n_data)
        p = [math.exp(s) / z for s in row]
        total += math.log(p[0] / (p[0] + noise + NCE_EPS))
        for j in range(1, k + 1):
            total += math.log(noise / (p[j] + noise + NCE_EPS))
    return -total / len(scores)


def reference_scores(anchor: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, t: float) -> list[list[float]]:
    rows = []
    for b in range(anchor.shape[0]):
        row = []
        for j in idx[b].tolist():
            row.append(sum(m * a for m, a in zip(memory[j].tolist(), anchor[b].tolist())) / t)
        rows.append(row)
    return rows


def reference_z(scores: list[list[float]], n_data: int) -> float:
    flat = [math.exp(s) for row in scores for s in row]
    return sum(flat) / len(flat) * n_data


# ------------------------------------------------------------------ NCE loss
def test_nce_loss_by_hand():
    # K = 1, N = 2: K/N = 1/2; P = exp(0) / 1 = 1 for both entries.
    # -(log(1 / (1.5 + eps)) + log(0.5 / (1.5 + eps))) = log(1.5) + log(3) = log(4.5)
    value = crd_nce_loss(torch.zeros(1, 2), 0.0, 2)
    assert value.item() == pytest.approx(math.log(4.5), rel=1e-6)
    # log Z = log 2 halves P: -(log(0.5 / 1) + log(0.5 / 1)) = 2 log 2
    assert crd_nce_loss(torch.zeros(3, 2, dtype=torch.float64), math.log(2), 2).item() == pytest.approx(
        2 * math.log(2), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 4), k=st.integers(1, 12), n_data=st.integers(20, 60000), seed=st.integers(0, 2**16),
       spread=st.floats(0.0, 15.0), log_z=st.floats(-5.0, 15.0))
def test_nce_loss_matches_the_reference_sample_by_sample(b, k, n_data, seed, spread, log_z):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(b, k + 1, generator=g, dtype=torch.float64) * 2 - 1) * spread
    expected = reference_contrast_loss(scores.tolist(), math.exp(log_z), n_data)
    assert crd_nce_loss(scores, log_z, n_data).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert crd_nce_loss(scores, torch.tensor(log_z, dtype=torch.float64), n_data).item() == pytest.approx(
        expected, rel=1e-9, abs=1e-9)


def test_nce_loss_gradient_check_and_direction():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: crd_nce_loss(s, 1.3, 100), (scores,))
    (grad,) = torch.autograd.grad(crd_nce_loss(scores, 1.3, 100), scores)
    assert (grad[:, 0] < 0).all() and (grad[:, 1:] > 0).all()  # raise the positive, lower the negatives


def test_nce_loss_is_finite_where_the_reference_overflows():
    extreme = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]])
    value = crd_nce_loss(extreme, 0.0, 50000)
    assert torch.isfinite(value)
    # Confident positive, negatives at -inf-like scores: the loss tends to 0.
    assert crd_nce_loss(torch.tensor([[1e4, -1e4, -1e4]]), 0.0, 10).item() == pytest.approx(0.0, abs=1e-6)
    half = crd_nce_loss(torch.tensor([[14.0, -14.0, 14.0]], dtype=torch.float16), 10.0, 50000)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half.item() == pytest.approx(reference_contrast_loss([[14.0, -14.0, 14.0]], math.exp(10.0), 50000), rel=1e-5)


def test_nce_loss_refuses_bad_shapes():
    with pytest.raises(ValueError, match="K >= 1"):
        crd_nce_loss(torch.zeros(2, 1), 0.0, 10)
    with pytest.raises(ValueError, match="num_data"):
        crd_nce_loss(torch.zeros(2, 3), 0.0, 0)


# ------------------------------------------------------------------ scores, Z, bank update
@pytest.mark.parametrize("n_data, dim, k", [(6, 4, 3), (40, 2, 3)])  # whole-bank product / gathered rows
def test_contrast_logits_match_the_reference(n_data, dim, k):
    g = torch.Generator().manual_seed(n_data)
    anchor = torch.nn.functional.normalize(torch.randn(3, dim, generator=g, dtype=torch.float64), dim=1)
    memory = torch.randn(n_data, dim, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n_data, (3, k + 1), generator=g)
    value = contrast_logits(anchor, memory, idx, 0.07)
    torch.testing.assert_close(value, torch.tensor(reference_scores(anchor, memory, idx, 0.07), dtype=torch.float64))
    # Gradients reach the anchor only, and the bank may be updated in place before the backward.
    a = anchor.clone().requires_grad_(True)
    m = memory.clone().requires_grad_(True)
    out = contrast_logits(a, m, idx, 0.5)
    with torch.no_grad():
        m.mul_(0.0)
    out.sum().backward()
    assert m.grad is None
    torch.testing.assert_close(a.grad, memory[idx].sum(1) / 0.5)
    v = anchor.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: contrast_logits(v, memory, idx, 0.3), (v,))


def test_both_score_paths_agree():
    g = torch.Generator().manual_seed(3)
    anchor = torch.randn(4, 8, generator=g)
    idx = torch.randint(0, 30, (4, 5), generator=g)
    memory = torch.randn(30, 8, generator=g)
    wide = contrast_logits(anchor, memory, idx, 0.1)  # 30 <= 5 * 8: whole-bank product
    narrow = contrast_logits(anchor, memory, idx[:, :3], 0.1)  # 30 > 3 * 8: gathered rows
    torch.testing.assert_close(wide[:, :3], narrow)


def test_scores_are_float32_under_autocast():
    anchor, memory = torch.randn(2, 8), torch.randn(10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = contrast_logits(anchor, memory, torch.zeros(2, 3, dtype=torch.long), 0.07)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, (anchor @ memory[0])[:, None].expand(2, 3) / 0.07)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), k=st.integers(1, 8), n_data=st.integers(1, 10**6), seed=st.integers(0, 2**16),
       spread=st.floats(0.0, 20.0))
def test_normalizer_is_mean_exp_times_n(b, k, n_data, seed, spread):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(b, k + 1, generator=g, dtype=torch.float64) * 2 - 1) * spread
    expected = math.log(reference_z(scores.tolist(), n_data))
    assert nce_log_normalizer(scores, n_data).item() == pytest.approx(expected, rel=1e-6, abs=1e-5)


def test_normalizer_is_finite_for_huge_scores():
    assert torch.isfinite(nce_log_normalizer(torch.full((4, 5), 1e4), 50000))


def test_momentum_update_by_hand():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    new = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    out = momentum_update(rows, new, 0.5)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[s, s], [0.0, 1.0], [0.0, 0.0]]))  # the last cancels: zero, no NaN
    torch.testing.assert_close(momentum_update(rows[:2], new[:2], 1.0), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(momentum_update(rows, new, 0.0), torch.nn.functional.normalize(new, dim=1))


def test_init_memory_like_the_reference():
    bank = init_memory(5000, 128, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(128 / 3)
    assert bank.shape == (5000, 128) and bank.abs().max() <= bound
    assert bank.norm(dim=1).mean().item() == pytest.approx(1.0, abs=0.02)  # unit norm in expectation


# ------------------------------------------------------------------ negatives
def test_negative_pools():
    positives = torch.tensor([0, 3])
    pool = negative_pool(positives, 5)
    assert pool.tolist() == [[False, True, True, True, True], [True, True, True, False, True]]
    labels = torch.tensor([0, 1, 0, 1, 2])
    pool = negative_pool(positives, 5, labels)
    assert pool.tolist() == [[False, True, False, True, True], [True, False, True, False, True]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 60), classes=st.integers(2, 5), b=st.integers(1, 6), seed=st.integers(0, 2**16),
       replacement=st.booleans())
def test_negatives_come_only_from_the_pool(n, classes, b, seed, replacement):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    positives = torch.randperm(n, generator=g)[:b]
    pool = negative_pool(positives, n, labels)
    k = int(pool.sum(1).min())  # as many as the smallest pool holds
    drawn = contrast_indices(positives, pool, k, replacement, g)
    assert drawn.shape == (b, k + 1) and torch.equal(drawn[:, 0], positives)
    negatives = drawn[:, 1:]
    assert (labels[negatives] != labels[positives][:, None]).all()
    if not replacement:
        assert all(len(set(row)) == k for row in negatives.tolist())


def test_negatives_are_uniform_over_the_pool():
    g = torch.Generator().manual_seed(0)
    positives = torch.zeros(200, dtype=torch.long)
    pool = negative_pool(positives, 6)
    drawn = contrast_indices(positives, pool, 50, True, g)[:, 1:]
    counts = torch.bincount(drawn.flatten(), minlength=6)
    assert counts[0] == 0
    assert ((counts[1:].float() / 2000 - 1).abs() < 0.1).all()  # 10000 draws over 5 candidates


def test_first_occurrences():
    idx = torch.tensor([4, 2, 4, 7, 2, 9])
    keep = first_occurrences(idx)
    assert sorted(keep.tolist()) == [0, 1, 3, 5]


# ------------------------------------------------------------------ the method
class Labeled(list):
    """A stand-in training set: only its length and its labels matter to CRD's setup."""

    def __init__(self, labels):
        super().__init__((None, int(y)) for y in labels)
        self.targets = list(labels)


def context(n: int = 64, classes: int = 10, seed: int = 0, **kw) -> SetupContext:
    data = Labeled([i % classes for i in range(n)])
    return SetupContext(train_set=data, num_train_samples=n, num_classes=classes,
                        data_cfg=load_config(data={"model": {"name": "resnet8"}}).data, seed=seed,
                        device=torch.device("cpu"), run_dir=None, **kw)


def build(teacher: str = "resnet8", student: str = "resnet8", classes: int = 10, **cfg) -> CRD:
    torch.manual_seed(0)
    cls = method_class("crd")
    cfg.setdefault("num_negatives", 20)
    return cls(create_model(student, classes), create_model(teacher, classes), cls.Config(**cfg),
               input_size=(3, 32, 32), num_classes=classes)


def batch(indices, classes: int = 10, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    indices = torch.as_tensor(indices)
    return Batch(torch.randn(len(indices), 3, 32, 32, generator=g), indices % classes, indices=indices)


def capture(d: CRD) -> dict:
    """Record the embeddings and drawn rows of the next steps."""
    seen: dict = {}
    d.embed_student.register_forward_hook(lambda m, i, o: seen.__setitem__("v_s", o.detach().clone()))
    d.embed_teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("v_t", o.detach().clone()))
    draw = d.draw

    def recording(indices):
        seen["sample"] = draw(indices)
        return seen["sample"]

    d.draw = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("teacher, student, widths", [
    ("resnet32x4", "resnet8x4", (256, 256)), ("wrn_40_2", "wrn_16_2", (128, 128)),
    ("vgg13", "MobileNetV2", (512, 1280)), ("ResNet50", "MobileNetV2", (2048, 1280)),
])
def test_builds_and_trains_on_published_pairs(teacher, student, widths):
    d = build(teacher, student, classes=100)
    assert (d.embed_teacher.linear.in_features, d.embed_student.linear.in_features) == widths
    assert d.embed_student.linear.out_features == 128
    d.setup(context(n=40, classes=100))
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05, momentum=0.9)
    d.train()
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    for step, idx in enumerate(([0, 5, 9, 13], [2, 5, 30, 39]), start=1):
        out = d(batch(idx, classes=100, seed=step), step)
        assert set(out.losses) == {"ce", "crd"} and all(torch.isfinite(v) for v in out.losses.values())
        opt.zero_grad()
        sum(out.losses.values()).backward()
        assert all(p.grad is None for p in d.teacher.parameters())
        assert d.embed_teacher.linear.weight.grad.abs().sum() > 0  # the teacher's head learns
        opt.step()
    for k, v in d.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])


def test_capabilities_and_what_is_trained_and_saved():
    d = build()
    assert d.needs_sample_indices and d.needs_teacher_features and d.requires_teacher
    trainable = {id(p) for p in d.trainable_parameters()}
    for head in (d.embed_student, d.embed_teacher):
        assert all(id(p) in trainable for p in head.parameters())
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    d.setup(context(n=64))
    extra = d.extra_state_dict()
    assert set(extra) == {"embed_student.linear.weight", "embed_student.linear.bias", "embed_teacher.linear.weight",
                          "embed_teacher.linear.bias", "memory.student", "memory.teacher", "memory.log_z",
                          "memory._extra_state"}
    assert all(isinstance(v, torch.Tensor) for v in extra.values())  # the checkpoint holds tensors only
    assert extra["memory.student"].shape == extra["memory.teacher"].shape == (64, 128)
    assert not any(k.startswith("teacher.") for k in extra)
    assert set(d.ddp_local_buffers) == {"memory.student", "memory.teacher", "memory.log_z"}
    assert set(d.ddp_local_buffers) <= set(d.extra_state_dict())  # real buffers, checkpointed


def test_one_step_equals_the_reference_and_updates_only_the_batch_rows():
    d = build(num_negatives=9, momentum=0.3)
    d.setup(context(n=64))
    seen = capture(d)
    d.train()
    before = {k: v.clone() for k, v in d.memory.state_dict().items()}
    idx = torch.tensor([3, 17, 40, 63])
    out = d.forward_train(batch(idx), 1)
    sample, v_s, v_t = seen["sample"], seen["v_s"], seen["v_t"]
    # Negatives: never the sample itself, never its class (negatives=other_classes).
    assert torch.equal(sample[:, 0], idx) and ((sample[:, 1:] % 10) != (idx % 10)[:, None]).all()
    # The losses, from the bank as it was before the step, written out sample by sample.
    s_scores = reference_scores(v_s, before["teacher"], sample, 0.07)
    t_scores = reference_scores(v_t, before["student"], sample, 0.07)
    z_s, z_t = reference_z(s_scores, 64), reference_z(t_scores, 64)
    ref_s = reference_contrast_loss(s_scores, z_s, 64)
    ref_t = reference_contrast_loss(t_scores, z_t, 64)
    assert out.stats["crd_student"].item() == pytest.approx(ref_s, rel=1e-4)
    assert out.stats["crd_teacher"].item() == pytest.approx(ref_t, rel=1e-4)
    assert out.losses["crd"].item() == pytest.approx(0.8 * (ref_s + ref_t), rel=1e-4)
    torch.testing.assert_close(d.memory.log_z, torch.tensor([math.log(z_s), math.log(z_t)]), rtol=1e-5, atol=1e-5)
    # The bank: the batch's rows moved to normalize(0.3 old + 0.7 new), every other row untouched.
    after = d.memory.state_dict()
    others = torch.ones(64, dtype=torch.bool)
    others[idx] = False
    for name, v in (("student", v_s), ("teacher", v_t)):
        torch.testing.assert_close(after[name][others], before[name][others], rtol=0, atol=0)
        expected = 0.3 * before[name][idx] + 0.7 * v
        torch.testing.assert_close(after[name][idx], expected / expected.norm(dim=1, keepdim=True))
        torch.testing.assert_close(after[name][idx].norm(dim=1), torch.ones(4))


def test_normalisation_constants_are_set_once():
    d = build()
    d.setup(context())
    d.train()
    d.forward_train(batch([0, 1, 2, 3]), 1)
    first = d.memory.log_z.clone()
    assert torch.isfinite(first).all()
    d.forward_train(batch([4, 5, 6, 7], seed=2), 1)
    torch.testing.assert_close(d.memory.log_z, first, rtol=0, atol=0)


def test_negatives_all_mode_and_small_pools():
    d = build(negatives="all", num_negatives=63)
    d.setup(context(n=64))
    assert not d.replacement and d.labels is None
    seen = capture(d)
    d.train()
    d.forward_train(batch([5, 6]), 1)
    for row in seen["sample"].tolist():  # every other sample exactly once
        assert sorted(row[1:]) == [i for i in range(64) if i != row[0]]
    d = build(num_negatives=100)  # more than the 57 candidates of another class: with replacement
    d.setup(context(n=64))
    assert d.replacement
    with pytest.raises(ConfigError, match="single class"):
        build().setup(context(n=8, classes=1))


def test_labels_are_read_item_by_item_without_targets():
    d = build()
    data = [(None, i % 4) for i in range(16)]  # a plain list: no .targets
    ctx = context(n=16, classes=4)
    d.setup(SetupContext(**{**ctx.__dict__, "train_set": data}))
    assert d.labels.tolist() == [i % 4 for i in range(16)]


def test_refuses_to_train_without_indices_or_setup():
    d = build()
    d.train()
    with pytest.raises(TrainingError, match="setup"):
        d.forward_train(batch([0, 1]), 1)
    d.setup(context())
    with pytest.raises(TrainingError, match="Batch.indices"):
        d.forward_train(Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), 1)


def test_draws_are_reproducible_and_differ_per_rank():
    def draws(rank: int, world: int = 2, global_seed: int = 7) -> torch.Tensor:
        d = build()
        d.setup(context(world_size=world, rank=rank))
        torch.manual_seed(global_seed)
        return torch.stack([d.draw(torch.tensor([0, 1, 2])) for _ in range(2)])

    assert torch.equal(draws(0), draws(0))
    assert torch.equal(draws(0), draws(0, global_seed=8))  # whatever else uses the global RNG
    assert not torch.equal(draws(0), draws(1))
    assert not torch.equal(draws(0)[0], draws(0)[1])  # successive steps differ


def test_resume_from_extra_state_continues_identically():
    """Train two steps; a fresh distiller set up like the first, given the first step's extra
    state and weights, makes the same second step (the draw count is in the state)."""
    a = build()
    a.setup(context(seed=1))
    a.train()
    a.forward_train(batch([0, 1, 2, 3]), 1)
    saved = {k: v.clone() for k, v in a.extra_state_dict().items()}
    student = {k: v.clone() for k, v in a.student.state_dict().items()}
    second_a = a.forward_train(batch([4, 5, 1, 9], seed=3), 1)

    b = build()
    b.setup(context(seed=1))  # the run's seed: fresh banks, then replaced by the checkpoint's
    assert not torch.equal(b.memory.student, saved["memory.student"]) and b.memory.draws == 0
    b.load_extra_state_dict(saved)
    b.student.load_state_dict(student)
    b.train()
    torch.manual_seed(12345)  # the global RNG plays no part
    second_b = b.forward_train(batch([4, 5, 1, 9], seed=3), 1)
    for key in second_a.losses:
        torch.testing.assert_close(second_b.losses[key], second_a.losses[key], rtol=0, atol=0)
    for key, value in a.extra_state_dict().items():
        torch.testing.assert_close(b.extra_state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_of_another_training_set_is_refused_clearly():
    a = build()
    a.setup(context(n=64))
    b = build()
    b.setup(context(n=32))
    with pytest.raises(CheckpointError, match="holds 64 training samples.*has 32"):
        b.load_extra_state_dict(a.extra_state_dict())
    c = build()  # never set up (evaluation tools): takes the checkpoint's size
    c.load_extra_state_dict(a.extra_state_dict())
    torch.testing.assert_close(c.memory.teacher, a.memory.teacher, rtol=0, atol=0)


def test_non_finite_embeddings_do_not_poison_the_bank():
    d = build()
    d.setup(context())
    before = d.memory.student.clone()
    v = torch.nn.functional.normalize(torch.randn(3, 128), dim=1)
    v[1] = float("nan")
    d.update_memory(torch.tensor([0, 1, 2]), v, v)
    assert torch.isfinite(d.memory.student).all()
    torch.testing.assert_close(d.memory.student[1], before[1], rtol=0, atol=0)
    assert not torch.equal(d.memory.student[0], before[0])


def test_mixed_precision_step_is_finite():
    d = build()
    d.setup(context())
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d.forward_train(batch([0, 1, 2, 3]), 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    assert d.memory.student.dtype == torch.float32


# ------------------------------------------------------------------ through the engine
@pytest.mark.slow
def test_interrupted_mid_epoch_and_resumed_equals_uninterrupted(make_config, tmp_path):
    """`kdlab train` end to end: a CRD run stopped after its second batch (the mid-epoch Ctrl-C
    save) and resumed ends with the same student, heads, banks and draw count as a run that was
    never stopped."""
    from kdlab.engine.callbacks import Callback
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    class StopAfterTwoBatches(Callback):
        def on_step_end(self, trainer, batch_number, result):
            if batch_number == 2:
                raise KeyboardInterrupt

    Trainer(load_config(data=make_config(name="teacher"))).fit()
    teacher = {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "teacher" / "last.pt")}

    def config(name: str):
        return load_config(data=make_config(name=name, teacher=teacher, train={"epochs": 2},
                                            method={"name": "crd", "num_negatives": 64}))

    Trainer(config("straight")).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config("resumed"), callbacks=[StopAfterTwoBatches()]).fit()
    assert Checkpoint.load(tmp_path / "runs" / "resumed" / "last.pt").partial["batches"] == 2
    Trainer(config("resumed"), resume=True).fit()
    a, b = (Checkpoint.load(tmp_path / "runs" / n / "last.pt") for n in ("straight", "resumed"))
    assert set(a.extra_state) == set(b.extra_state) and "memory.student" in a.extra_state
    for key, value in a.extra_state.items():
        torch.testing.assert_close(b.extra_state[key], value, rtol=0, atol=0)
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------ DDP: two processes
WORKER = r"""
import sys
import torch
import torch.distributed as dist
from kdlab.engine.distributed import wrap_ddp
from kdlab.methods import method_class
from kdlab.methods.base import Batch, SetupContext
from kdlab.models import create_model

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
cls = method_class("crd")
d = cls(create_model("resnet8", 10), create_model("resnet8", 10), cls.Config(num_negatives=20))

class Data(list):
    targets = [i % 10 for i in range(64)]

data = Data([None] * 64)
d.setup(SetupContext(train_set=data, num_train_samples=64, num_classes=10, data_cfg=None, seed=5,
                     device=torch.device("cpu"), run_dir=None, world_size=2, rank=rank))
before = {k: v.clone() for k, v in d.memory.state_dict().items()}
seen = {}
d.embed_student.register_forward_hook(lambda m, i, o: seen.__setitem__("v_s", o.detach().clone()))
d.embed_teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("v_t", o.detach().clone()))
ddp = wrap_ddp(d, None)  # the engine's wrapper: leaves out the method's rank-local buffers
d.train()
torch.manual_seed(100)  # the same per-epoch seed on every rank, as the engine does
g = torch.Generator().manual_seed(1000 + rank)
indices = torch.tensor([[0, 5, 9, 12], [12, 30, 31, 63]][rank])  # 12 twice: a padded duplicate
result = ddp(Batch(torch.randn(4, 3, 32, 32, generator=g), indices % 10, indices=indices), 1)
sum(result.losses.values()).backward()
torch.save({"indices": indices, **seen, "before": before,
            "after": {k: v.clone() for k, v in d.memory.state_dict().items()},
            "ignored": sorted(ddp.parameters_to_ignore),
            "grad": d.embed_student.linear.weight.grad.clone()}, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_banks_stay_identical_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path / f"{r}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert {"memory.student", "memory.teacher", "memory.log_z"} <= set(r0["ignored"])
    for name in ("student", "teacher", "log_z"):
        torch.testing.assert_close(r0["after"][name], r1["after"][name], rtol=0, atol=0)
    torch.testing.assert_close(r0["before"]["student"], r1["before"]["student"], rtol=0, atol=0)
    torch.testing.assert_close(r0["grad"], r1["grad"])  # DDP averaged the heads' gradients
    # Every rank applied every rank's rows; the duplicate (12) from its first copy (rank 0's).
    before = r0["before"]
    for name, key in (("student", "v_s"), ("teacher", "v_t")):
        expected = before[name].clone()
        done = set()
        for r in (r0, r1):
            for i, row in zip(r["indices"].tolist(), r[key]):
                if i not in done:
                    mixed = 0.5 * before[name][i] + 0.5 * row
                    expected[i] = mixed / mixed.norm()
                    done.add(i)
        torch.testing.assert_close(r0["after"][name], expected)


# ------------------------------------------------------------------ configs and rows
def test_every_crd_config_loads_with_the_papers_settings():
    paths = sorted(glob.glob(str(ROOT / "configs" / "cifar100" / "crd" / "*.yaml")))
    assert {Path(p).stem for p in paths} == set(PUBLISHED)
    for path in paths:
        cfg = load_config(path)
        m = cfg.method
        assert m.name == "crd" and cfg.name == "crd_" + Path(path).stem
        assert (m.ce_weight, m.weight, m.feat_dim, m.num_negatives, m.temperature, m.momentum) == (
            1.0, 0.8, 128, 16384, 0.07, 0.5)
        assert m.negatives == "other_classes"
        assert f"{cfg.teacher.name}_{cfg.model.name}" == Path(path).stem
        assert cfg.teacher.checkpoint == f"runs/teacher_{cfg.teacher.name}/last.pt"
        small = cfg.model.name in ("ShuffleV1", "ShuffleV2", "MobileNetV2")
        assert cfg.optim.lr == (0.01 if small else 0.05) and cfg.data.batch_size == 64
        assert cfg.train.epochs == 240 and cfg.schedule.milestones == [150, 180, 210]


def test_crd_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        load_config(data={"model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": "t.pt"},
                          "method": {"name": "crd", "momentum": 1.5}})
    with pytest.raises(ConfigError):
        load_config(data={"model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": "t.pt"},
                          "method": {"name": "crd", "negatives": "same_class"}})


def test_reproduce_rows_carry_the_published_numbers():
    from kdlab.reproduce.table import load_rows

    rows = {r.id: r for r in load_rows() if r.method == "crd"}
    assert {i.split("/")[-1] for i in rows} == set(PUBLISHED)
    for pair, number in PUBLISHED.items():
        row = rows[f"crd/cifar100/{pair}"]
        assert row.published == number and row.metric == "top1" and row.dataset == "cifar100"
        assert row.config == f"configs/cifar100/crd/{pair}.yaml" and (ROOT / row.config).is_file()
        assert (ROOT / row.teacher_config).is_file()
