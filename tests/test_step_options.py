"""`train.grad_clip` and `train.accumulate` in the shared training step: each equal to the literal
computation it stands for, neither reading a tensor on the host, and both reachable from a config."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.config import load_config
from kdlab.schema.experiment import OptimConfig
from kdlab.engine.optim import build_optimizer
from kdlab.engine.step import TrainStep, micro_batches
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.methods.base import Batch
from kdlab.methods.vanilla import Vanilla, VanillaConfig
from test_step import _no_host_reads

OPTIM = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)


def _net(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)]
    return nn.Sequential(*layers)


def _batch(n: int = 10, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g), torch.arange(n),
                 extras={"views": torch.arange(n) * 2, "note": "kept"})


def _step(net: nn.Module, **options) -> tuple[Vanilla, TrainStep]:
    distiller = Vanilla(net, None, VanillaConfig())
    return distiller, TrainStep.for_distiller(distiller, OPTIM, torch.device("cpu"), **options)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ micro-batches
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 17), parts=st.integers(1, 20))
def test_micro_batches_cut_every_per_sample_field_the_same_way(n, parts):
    batch = _batch(n)
    pieces = micro_batches(batch, parts)
    sizes = [p.size for p in pieces]
    assert sum(sizes) == n and len(pieces) == min(parts, n)
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(torch.cat([p.images for p in pieces]), batch.images)
    assert torch.equal(torch.cat([p.targets for p in pieces]), batch.targets)
    assert torch.equal(torch.cat([p.indices for p in pieces]), batch.indices)
    assert torch.equal(torch.cat([p.extras["views"] for p in pieces]), batch.extras["views"])
    assert all(p.extras["note"] == "kept" and p.teacher_logits is None for p in pieces)


def test_micro_batches_split_lists_and_cached_logits():
    batch = Batch([torch.zeros(3, 2, 2)] * 5, [{"boxes": i} for i in range(5)], torch.arange(5),
                  teacher_logits=torch.arange(10.0).reshape(5, 2))
    a, b = micro_batches(batch, 2)
    assert [t["boxes"] for t in a.targets + b.targets] == list(range(5))
    assert torch.equal(torch.cat([a.teacher_logits, b.teacher_logits]), batch.teacher_logits)


# ------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("parts", [2, 3, 10])
def test_accumulation_without_batch_norm_equals_the_full_batch(parts):
    batch = _batch()
    full, full_step = _step(_net(False))
    acc, acc_step = _step(_net(False), accumulate=parts)
    for _ in range(2):  # a second step also checks the momentum buffers
        r_full, r_acc = full_step(batch, 1), acc_step(batch, 1)
    torch.testing.assert_close(r_acc.loss, r_full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r_acc.out.logits, r_full.out.logits, rtol=1e-5, atol=1e-6)
    for name, value in _params(full).items():
        torch.testing.assert_close(_params(acc)[name], value, rtol=1e-5, atol=1e-6)


def test_accumulation_with_batch_norm_equals_the_literal_loop():
    """Each micro-batch normalised by its own statistics: the loop every accumulating trainer runs."""
    batch = _batch()
    acc, acc_step = _step(_net(True), accumulate=3)
    acc_step(batch, 1)

    net = _net(True)
    optimizer = build_optimizer(net.parameters(), OPTIM)
    optimizer.zero_grad()
    for a, b in [(0, 3), (3, 7), (7, 10)]:
        loss = cross_entropy(net(batch.images[a:b]), batch.targets[a:b]) * (b - a) / 10
        loss.backward()
    optimizer.step()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(acc.student.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_bad_micro_batch_skips_the_whole_update():
    batch = _batch()
    batch.images[8] = float("nan")  # the last micro-batch only
    distiller, step = _step(_net(False), accumulate=3)
    before = _params(distiller)
    result = step(batch, 1)
    assert not bool(result.finite)
    for name, value in before.items():
        assert torch.equal(distiller.state_dict()[name], value)


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_equals_the_literal_rescaling(max_norm):
    batch = _batch()
    distiller, step = _step(_net(True), grad_clip=max_norm)
    step(batch, 1)

    net = _net(True)
    optimizer = build_optimizer(net.parameters(), OPTIM)
    cross_entropy(net(batch.images), batch.targets).backward()
    grads = [p.grad for p in net.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    for g in grads:
        g.mul_(scale)
    optimizer.step()
    assert (scale < 1.0) == (max_norm < 1.0)  # the small bound clips, the large one does not
    for name, value in net.state_dict().items():
        torch.testing.assert_close(distiller.student.state_dict()[name], value, rtol=1e-5, atol=1e-7)


def test_clipping_and_accumulation_read_nothing_on_the_host():
    _, step = _step(_net(True), grad_clip=0.5, accumulate=2)
    batch = _batch()
    with _no_host_reads():
        step(batch, 1)


def test_clipping_under_fp16_scaling_unscales_first():
    """With the gradient scaler, the clip bound applies to the true gradients, not the scaled ones."""
    batch = _batch()
    plain, plain_step = _step(_net(False), grad_clip=1e-3)
    scaled, scaled_step = _step(_net(False), grad_clip=1e-3)
    scaled_step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plain_step(batch, 1)
    scaled_step(batch, 1)
    for name, value in _params(plain).items():
        torch.testing.assert_close(_params(scaled)[name], value, rtol=1e-4, atol=1e-6)


def test_the_settings_reach_the_trainer(make_config):
    from kdlab.engine.trainer import Trainer  # lazy: builds the engine only for this test

    cfg = load_config(data=make_config(train={"epochs": 1, "grad_clip": 0.25, "accumulate": 2,
                                              "progress": False, "tensorboard": False, "device": "cpu"}))
    trainer = Trainer(cfg)
    trainer.fit()
    assert (trainer.step.grad_clip, trainer.step.accumulate) == (0.25, 2)
    assert trainer.history and trainer.history[-1]["epoch"] == 1


def test_bad_values_are_config_errors(make_config):
    for bad in ({"accumulate": 0}, {"grad_clip": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_config(data=make_config(train=bad))
