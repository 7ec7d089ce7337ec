"""FT: the losses against RepDistiller's transcribed in float64 and hand values, the paraphraser
and translator equal to the reference modules, the tensors the reference chooses, the two
method-owned phases through the protocol and the trainer, the configs and the reproduce rows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdlab.errors import ConfigError
from kdlab.losses.ft import factor_map, ft_loss, reconstruction_loss
from kdlab.methods.ft import FT, FTConfig, Paraphraser, translator
from kdlab.models import create_model

from featurekit import (THREE_PAIRS, Plain, assert_phases, batch, build_pair, check_bf16_step_is_finite,
                        check_cifar_rows, cifar_configs, train_two_phases)

# PAPERS.md section 6: FT top-1 on CIFAR-100 (CRD benchmark README).
PUBLISHED = {
    "wrn_40_2_wrn_16_2": 73.25, "wrn_40_2_wrn_40_1": 71.59, "resnet56_resnet20": 69.84,
    "resnet110_resnet20": 70.22, "resnet110_resnet32": 72.37, "resnet32x4_resnet8x4": 72.86,
    "vgg13_vgg8": 70.58, "vgg13_MobileNetV2": 61.78, "ResNet50_MobileNetV2": 60.99, "ResNet50_vgg8": 70.29,
    "resnet32x4_ShuffleV1": 71.75, "resnet32x4_ShuffleV2": 72.50, "wrn_40_2_ShuffleV1": 72.03,
}


# ------------------------------------------------------------------ the reference, transcribed
def reference_factor_loss(f_s, f_t, p1=2, p2=1):
    """RepDistiller distiller_zoo/FT.py (FactorTransfer.factor_loss, factor) @ b84f547."""
    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    if p2 == 1:
        return (factor(f_s) - factor(f_t)).abs().mean()
    return (factor(f_s) - factor(f_t)).pow(p2).mean()


class ReferenceParaphraser(nn.Module):
    """RepDistiller models/util.py Paraphraser @ b84f547 (t_shape -> its channel count)."""

    def __init__(self, in_channel, k=0.5, use_bn=False):
        super().__init__()
        out_channel = int(in_channel * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(out_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s, is_factor=False):
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        rec = self.decoder(factor)
        return factor, rec


class ReferenceTranslator(nn.Module):
    """RepDistiller models/util.py Translator @ b84f547 (s_shape, t_shape -> channel counts)."""

    def __init__(self, in_channel, t_channel, k=0.5, use_bn=True):
        super().__init__()
        out_channel = int(t_channel * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s):
        return self.encoder(f_s)


def copy_weights(ours: nn.Module, reference: nn.Module) -> None:
    """Copy `ours`'s parameters and buffers into `reference`, in registration order."""
    src, dst = list(ours.state_dict().values()), list(reference.state_dict().values())
    assert [t.shape for t in src] == [t.shape for t in dst]
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.copy_(a)


# ------------------------------------------------------------------ the losses
def test_by_hand():
    f = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(factor_map(f), torch.tensor([[9.0, 16.0]]) / math.sqrt(81 + 256))
    # Against a uniform map: the mean absolute difference of the two unit vectors.
    u = torch.ones(1, 1, 1, 2)
    expected = (abs(9 / math.sqrt(337) - 1 / math.sqrt(2)) + abs(16 / math.sqrt(337) - 1 / math.sqrt(2))) / 2
    assert ft_loss(f, u).item() == pytest.approx(expected)
    assert ft_loss(f * 5, f).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert reconstruction_loss(f, torch.zeros_like(f)).item() == pytest.approx((9 + 16) / 2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), cs=st.integers(1, 4), ct=st.integers(1, 4), hs=st.sampled_from([1, 2, 4, 8]),
       ht=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10))
def test_ft_loss_and_gradients_equal_the_reference(n, cs, ct, hs, ht, seed, scale):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, cs, hs, hs, generator=g, dtype=torch.float64) * scale).requires_grad_()
    t = torch.randn(n, ct, ht, ht, generator=g, dtype=torch.float64)
    ours, ref = ft_loss(s, t), reference_factor_loss(s, t)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(ours, s), torch.autograd.grad(ref, s), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(reconstruction_loss(s, s.detach() + 1), torch.ones((), dtype=torch.float64))


def test_gradient_checks_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ft_loss(a, t), (s,))
    target = 0.5 * s.detach().clone()  # not a view of s, which gradcheck perturbs in place
    assert torch.autograd.gradcheck(lambda a: reconstruction_loss(a, target), (s,))
    ft_loss(s, t).backward()
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_where_half_precision_overflows(dtype):
    s = torch.full((2, 3, 4, 4), 1000.0, dtype=dtype)  # squares 1e6 overflow float16
    for value in (ft_loss(s, torch.ones_like(s)), reconstruction_loss(s, torch.zeros_like(s))):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ft_loss(s.float() * 1000, torch.rand(2, 3, 2, 2))
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ------------------------------------------------------------------ modules, tensors and pairs
@pytest.mark.parametrize("t_channels, s_channels", [(256, 256), (256, 464), (512, 160)])
def test_paraphraser_and_translator_equal_the_reference_modules(t_channels, s_channels):
    """The three pairs' last stages (ResNet32x4 -> ResNet8x4 / ShuffleV2, VGG13 -> MobileNetV2):
    same layers, same shapes, and with the same weights the same outputs."""
    torch.manual_seed(0)
    ours_p, ref_p = Paraphraser(t_channels, t_channels // 2), ReferenceParaphraser(t_channels)
    ours_t, ref_t = translator(s_channels, t_channels // 2), ReferenceTranslator(s_channels, t_channels)
    copy_weights(ours_p, ref_p)
    copy_weights(ours_t, ref_t)
    ref_t.train()
    x_t, x_s = torch.randn(2, t_channels, 2, 2), torch.randn(2, s_channels, 2, 2)
    factor, rec = ours_p(x_t)
    ref_factor, ref_rec = ref_p(x_t.clone())
    torch.testing.assert_close(factor, ref_factor)
    torch.testing.assert_close(rec, ref_rec)
    torch.testing.assert_close(ours_t(x_s), ref_t(x_s.clone()))


def build(teacher: str, student: str, classes: int = 100, **cfg) -> FT:
    return build_pair("ft", teacher, student, classes, **cfg)



@pytest.fixture(scope="module")
def pairs():
    return {pair: build(*pair) for pair in THREE_PAIRS}


# The reference's feat[-2] (the last stage output) of each network, (C, H), and the factor width.
REFERENCE_LAST = {"resnet32x4": (256, 8), "resnet8x4": (256, 8), "ShuffleV2": (464, 4), "vgg13": (512, 4),
                  "MobileNetV2": (160, 2)}


@pytest.mark.parametrize("pair", THREE_PAIRS)
def test_uses_the_references_tensors_and_modules(pairs, pair):
    d = pairs[pair]
    d.train()
    teacher, student = pair
    (ct, _), (cs, _) = REFERENCE_LAST[teacher], REFERENCE_LAST[student]
    assert d.paraphraser.encoder[0].in_channels == ct and d.paraphraser.encoder[-3].out_channels == ct // 2
    assert d.translator[0].in_channels == cs and d.translator[-3].out_channels == ct // 2
    b = batch()
    out = d(b, 31)
    with torch.no_grad():
        _, sf = d.student(b.images, features=True)
        _, tf = d.teacher(b.images, features=True)
        assert (sf.raw_stages[-1].shape[1:3], tf.raw_stages[-1].shape[1:3]) == (REFERENCE_LAST[student],
                                                                               REFERENCE_LAST[teacher])
        factor_s = d.translator(sf.raw_stages[-1])
        factor_t = d.paraphraser.encoder(tf.raw_stages[-1])
    expected = 200 * reference_factor_loss(factor_s.double(), factor_t.double())
    torch.testing.assert_close(out.losses["ft"].detach().double(), expected, rtol=1e-5, atol=0)
    _, rec = d.paraphraser(tf.raw_stages[-1])
    torch.testing.assert_close(d(b, 1).losses["reconstruction"], F.mse_loss(rec, tf.raw_stages[-1]))


def test_two_phases_through_the_protocol(pairs):
    """Init: only the paraphraser learns, the student does not run; main: the paraphraser is
    frozen (no gradient), the translator and the student learn."""
    d = pairs[("resnet32x4", "ShuffleV2")]
    d.train()
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in [*d.paraphraser.parameters(), *d.translator.parameters()])
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    assert {k.split(".")[0] for k in d.extra_state_dict()} == {"paraphraser", "translator", "momentum_primed"}
    d._momentum_primed = True  # the zero-weighted touch of the first step is tested in test_fsp.py
    groups = {"paraphraser": d.paraphraser, "translator": d.translator, "student": d.student}
    for epoch, learning in ((30, {"paraphraser"}), (31, {"translator", "student"})):
        d.zero_grad(set_to_none=True)
        bn = d.student.bn1.running_mean.clone()
        out = d(batch(), epoch)
        assert list(out.losses) == ["ce", "ft", "reconstruction"]
        assert (out.logits is None) == (epoch == 30)
        assert torch.equal(d.student.bn1.running_mean, bn) == (epoch == 30)  # the student did not run
        sum(out.losses.values()).backward()
        for name, module in groups.items():
            assert all((p.grad is not None) == (name in learning) for p in module.parameters()), (epoch, name)
        assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training


def test_refuses_what_it_cannot_serve():
    with pytest.raises(ConfigError, match=r"does not accept model\(x, features=True\)"):
        FT(Plain(), create_model("resnet8", 10), FTConfig())
    with pytest.raises(ConfigError, match=r"= 0 channels; raise method.rate"):
        build("resnet8", "resnet8", classes=10, rate=0.01)


def test_mixed_precision_step_is_finite():
    check_bf16_step_is_finite("ft", epochs=(1, 31))


@pytest.mark.slow
def test_trains_both_phases_end_to_end_through_the_engine(make_config, tmp_path):
    from kdlab.engine.checkpoint import Checkpoint

    rows, run = train_two_phases(make_config, tmp_path, {"name": "ft"})
    assert_phases(rows, {"reconstruction"}, {"ce", "ft"})
    by_epoch = {r["epoch"]: r for r in rows}
    assert "train/top1" not in by_epoch[1] and "train/top1" in by_epoch[2]  # the student ran in epoch 2 only
    extra = Checkpoint.load(run / "last.pt").extra_state
    assert {k.split(".")[0] for k in extra} == {"paraphraser", "translator", "momentum_primed"}


# ------------------------------------------------------------------ configs and rows
def test_every_ft_config_loads_with_the_reference_settings():
    for cfg in cifar_configs("ft", PUBLISHED, init_epochs=30):
        m = cfg.method
        assert (m.ce_weight, m.ft_weight, m.rate) == (1.0, 200.0, 0.5)
        # helper/pretrain.py: the paraphraser trains at lr 0.01 for ResNet/WRN students, else at the
        # main rate; kdlab scales the reconstruction term instead (the same gradient steps).
        init_lr = 0.01 if cfg.model.name.startswith(("resnet", "wrn")) else cfg.optim.lr
        assert m.reconstruction_weight * cfg.optim.lr == pytest.approx(init_lr)


def test_reproduce_rows_carry_the_published_numbers():
    check_cifar_rows("ft", PUBLISHED)
