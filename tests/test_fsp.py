"""FSP: the loss against RepDistiller's transcribed in float64 and a hand value, the maps and the
pairs the reference serves, the two method-owned phases through the protocol, the engine's
step and the trainer, the shipped configs and the reproduce rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.config import load_config
from kdlab.schema.experiment import OptimConfig
from kdlab.errors import ConfigError
from kdlab.losses.fsp import fsp_loss, fsp_matrix
from kdlab.methods.phases import phase_losses

from featurekit import (assert_phases, batch, build_pair, check_bf16_step_is_finite, check_cifar_rows, cifar_configs,
                        context, train_two_phases)

# PAPERS.md section 6: FSP top-1 on CIFAR-100 (CRD benchmark README); n/a for WRN-40-2 -> WRN-40-1
# and absent from the cross-architecture table.
PUBLISHED = {
    "resnet56_resnet20": 69.95, "resnet110_resnet20": 70.11, "resnet110_resnet32": 71.89,
    "resnet32x4_resnet8x4": 72.62, "wrn_40_2_wrn_16_2": 72.91, "vgg13_vgg8": 70.23,
}


# ------------------------------------------------------------------ the reference, transcribed
def reference_fsp_loss(g_s, g_t):
    """RepDistiller distiller_zoo/FSP.py (FSP.forward, compute_fsp, compute_loss) @ b84f547,
    summed as helper/pretrain.py does (`loss = sum(loss_group)`)."""
    def compute_fsp(g):
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            fsp_list.append((bot * top).mean(-1))
        return fsp_list

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


def test_fsp_by_hand():
    bottom = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    top = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    assert fsp_matrix(bottom, top).item() == pytest.approx((1 * 3 + 2 * 4) / 2)
    zeros = [torch.zeros_like(bottom), torch.zeros_like(top)]
    assert fsp_loss([bottom, top], zeros).item() == pytest.approx(5.5**2)
    # Pooling: a 2x2 bottom of mean 2.5 against a 1x1 top of 2.
    assert fsp_matrix(torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2), torch.full((1, 1, 1, 1), 2.0)).item() == 5.0


maps = st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8])),
                min_size=2, max_size=4)


@settings(max_examples=40, deadline=None)
@given(levels=maps, n=st.integers(1, 3), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10))
def test_fsp_loss_and_gradients_equal_the_reference(levels, n, seed, scale):
    """Per level: channels (equal in both networks), the student's and the teacher's square size."""
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(n, c, h, h, generator=g, dtype=torch.float64, requires_grad=True) * scale
         for c, h, _ in levels]
    t = [torch.relu(torch.randn(n, c, h, h, generator=g, dtype=torch.float64)) for c, _, h in levels]
    ours, ref = fsp_loss(s, t), reference_fsp_loss(s, t)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s), torch.autograd.grad(ref, s), rtol=1e-10, atol=1e-12)
    assert fsp_loss(t, t).item() == 0.0


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda a, b: fsp_loss([a, b], t), tuple(s))
    fsp_loss(s, t).backward()
    assert t[0].grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_where_half_precision_overflows(dtype):
    s = [torch.full((2, 3, 4, 4), 300.0, dtype=dtype), torch.full((2, 2, 2, 2), 300.0, dtype=dtype)]
    t = [torch.zeros_like(m) for m in s]
    value = fsp_loss(s, t)  # products 9e4 overflow float16, squares 8e9 too
    assert value.dtype == torch.float32 and value.item() == pytest.approx(300.0**4)  # one map pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fsp_loss([m.float() * 100 for m in s], t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(30000.0**4, rel=1e-6)  # bf16 matmul would be 1e-2 off


def test_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="same number"):
        fsp_loss([torch.zeros(1, 2, 2, 2)] * 2, [torch.zeros(1, 2, 2, 2)] * 3)
    with pytest.raises(ValueError, match="same channel counts"):
        fsp_loss([torch.zeros(1, 2, 2, 2)] * 2, [torch.zeros(1, 3, 2, 2)] * 2)


# ------------------------------------------------------------------ the method
def build(teacher: str, student: str, classes: int = 100, **cfg):
    return build_pair("fsp", teacher, student, classes, **cfg)


@pytest.fixture(scope="module")
def resnet_pair():
    return build("resnet32x4", "resnet8x4")


def test_uses_the_references_maps_stem_and_stages(resnet_pair):
    """RepDistiller's `feat_s[:-1]`: the stem and the three stage outputs, 32-64-128-256 channels."""
    d = resnet_pair
    d.train()
    b = batch()
    out = d(b, 1)
    with torch.no_grad():
        _, sf = d.student(b.images, features=True)
        _, tf = d.teacher(b.images, features=True)
    s_maps, t_maps = [sf.stem, *sf.raw_stages], [tf.stem, *tf.raw_stages]
    assert [tuple(m.shape[1:]) for m in s_maps] == [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert [m.shape[1] for m in t_maps] == [m.shape[1] for m in s_maps]
    expected = reference_fsp_loss([m.double() for m in s_maps], [m.double() for m in t_maps])
    torch.testing.assert_close(out.losses["fsp"].detach().double(), expected, rtol=1e-5, atol=0)


def test_wrn_maps_are_the_raw_block_outputs():
    """For WRN the reference's feats are conv1 and the raw residual sums (no BN, no ReLU)."""
    d = build("wrn_40_2", "wrn_16_2")
    d.train()
    b = batch()
    value = d(b, 1).losses["fsp"].detach()
    with torch.no_grad():
        _, sf = d.student(b.images, features=True)
        _, tf = d.teacher(b.images, features=True)
    torch.testing.assert_close(value, fsp_loss([sf.stem, *sf.raw_stages], [tf.stem, *tf.raw_stages]))
    assert not torch.allclose(value, fsp_loss([sf.stem, *sf.stages], [tf.stem, *tf.stages]))


@pytest.mark.parametrize("teacher, student", [
    ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2"), ("wrn_40_2", "wrn_40_1")])
def test_refuses_the_pairs_the_reference_cannot_serve(teacher, student):
    # RepDistiller's FSP raises 'num of channels not equal (error in FSP)' for these.
    with pytest.raises(ConfigError, match=r"FSP cannot serve .*same channel counts.*student has \["):
        build(teacher, student)


def test_refuses_several_processes():
    with pytest.raises(ConfigError, match="one process"):
        build("resnet8", "resnet8", classes=10).setup(context(world_size=2))
    build("resnet8", "resnet8", classes=10).setup(context())


def test_two_phases_through_the_protocol(resnet_pair):
    d = resnet_pair
    d.train()
    init, main = d(batch(), 1), d(batch(), 31)  # default init_epochs 30
    assert list(init.losses) == list(main.losses) == ["ce", "fsp"]
    assert init.losses["ce"].item() == 0.0 and init.losses["fsp"].item() > 0
    assert main.losses["fsp"].item() == 0.0 and main.losses["ce"].item() > 0
    assert init.losses["fsp"].requires_grad and not init.losses["ce"].requires_grad
    assert init.logits.shape == main.logits.shape == (4, 100)
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    assert list(d.extra_state_dict()) == ["momentum_primed"]  # FSP owns no module
    assert not d.teacher.training


def test_engine_step_switches_phase_under_fused_sgd():
    """Through the engine's TrainStep (fused SGD, momentum, weight decay). Fused SGD cannot step
    a group where some parameters have momentum buffers and others get their first gradient, so
    the first init step touches every parameter: the classifier, idle in the init phase, then
    moves by one weight-decay step only; later init steps skip it (no gradient: no weight decay,
    no momentum); the main phase trains it."""
    from kdlab.engine.step import TrainStep

    lr, wd = 0.1, 5e-4
    d = build("resnet8", "resnet8", classes=10, init_epochs=1)
    d.train()
    step = TrainStep.for_distiller(d, OptimConfig(lr=lr, weight_decay=wd), torch.device("cpu"))
    assert step.on_device  # the fused optimizer of `kdlab train`
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    features = d.student.layer1[0].conv1.weight
    for epoch, head_moves in ((1, "decay"), (1, "no"), (2, "yes"), (2, "yes")):
        head, feat = d.student.fc.weight.detach().clone(), features.detach().clone()
        result = step(batch(classes=10, n=8), epoch)
        assert bool(result.finite)
        assert not torch.equal(features, feat)
        if head_moves == "decay":
            torch.testing.assert_close(d.student.fc.weight.detach(), head * (1 - lr * wd), rtol=1e-6, atol=0)
        elif head_moves == "no":
            assert torch.equal(d.student.fc.weight, head)
        else:
            assert (d.student.fc.weight - head).abs().max() > 10 * lr * wd * head.abs().max()
    for k, v in d.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("fsp")


def test_phase_losses_keeps_the_names_and_their_order():
    one = torch.tensor(1.0)
    assert phase_losses({"b": one}, ("a", "b")) == {"a": 0.0, "b": one}
    assert list(phase_losses({"a": one}, ("a", "b"))) == ["a", "b"]
    with pytest.raises(ValueError, match="not among"):
        phase_losses({"c": one}, ("a", "b"))


# ------------------------------------------------------------------ through the trainer
@pytest.mark.slow
def test_trains_both_phases_end_to_end_through_the_engine(make_config, tmp_path):
    rows, _ = train_two_phases(make_config, tmp_path, {"name": "fsp"})
    assert_phases(rows, {"fsp"}, {"ce"})


@pytest.mark.slow
@pytest.mark.parametrize("stop_epoch", [1, 2])
def test_interrupted_in_either_phase_and_resumed_equals_uninterrupted(make_config, tmp_path, stop_epoch):
    """Stopped after the second batch of an init epoch (1) or of a main epoch (2), saved, resumed:
    the same student and optimizer state as a run never stopped. The phase is a function of the
    epoch, and the first step's zero-weighted touch is recorded in the checkpoint, not repeated."""
    from kdlab.engine.callbacks import Callback
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    class Stop(Callback):
        epoch = 0

        def on_epoch_start(self, trainer, epoch, start):
            self.epoch = epoch

        def on_step_end(self, trainer, batch_number, result):
            if (self.epoch, batch_number) == (stop_epoch, 2):
                raise KeyboardInterrupt

    Trainer(load_config(data=make_config(name="teacher"))).fit()
    teacher = {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "teacher" / "last.pt")}

    def config(name: str):
        return load_config(data=make_config(name=name, teacher=teacher, optim={"lr": 0.05, "weight_decay": 5e-4},
                                            train={"epochs": 2}, method={"name": "fsp", "init_epochs": 1}))

    Trainer(config("straight")).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config("resumed"), callbacks=[Stop()]).fit()
    stopped = Checkpoint.load(tmp_path / "runs" / "resumed" / "last.pt")
    assert stopped.partial["batches"] == 2 and stopped.epoch == stop_epoch - 1
    assert stopped.extra_state["momentum_primed"].item()
    Trainer(config("resumed"), resume=True).fit()
    a, b = (Checkpoint.load(tmp_path / "runs" / n / "last.pt") for n in ("straight", "resumed"))
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, rtol=0, atol=0)
    for pa, pb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
        torch.testing.assert_close(pb["momentum_buffer"], pa["momentum_buffer"], rtol=0, atol=0)


# ------------------------------------------------------------------ configs and rows
def test_every_fsp_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("fsp", PUBLISHED, init_epochs=30):
        assert (cfg.method.ce_weight, cfg.method.fsp_weight) == (1.0, 1.0)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("fsp", PUBLISHED, unpublished=("wrn_40_2_wrn_40_1",))
