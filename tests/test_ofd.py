"""OFD: the margin and the partial L2 against mdistiller's code transcribed in float64 (and the OFD
authors' own form), the reference's stages, batch norms, connectors and loss + gradients on three
CIFAR pairs, training through the method protocol with the teacher frozen, the configs and the rows."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from torch import nn

from kdlab.config import load_config
from kdlab.errors import ConfigError
from kdlab.losses.ofd import ofd_loss, ofd_margin, partial_l2
from kdlab.methods import method_class
from kdlab.methods.base import Batch
from kdlab.methods.ofd import OFD, OFDConfig, batch_statistics
from kdlab.models import create_model
from kdlab.models.preact_bn import bn_before_relu
from kdlab.models.zoo.shufflenetv2 import channel_shuffle

from featurekit import CRD_PAIRS, ROOT, THREE_PAIRS, cifar_configs, train_teacher_then


# ------------------------------------------------------------------ mdistiller, transcribed
# megvii-research/mdistiller, mdistiller/distillers/OFD.py (feat_loss, OFD.init_ofd_modules's margins,
# OFD.ofd_loss, OFD._align_list, ConnectorConvBN), in float64.
def ref_feat_loss(source, target, margin):
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


def ref_margin(bn) -> torch.Tensor:
    margin = []
    for s, m in zip(bn.weight.data, bn.bias.data):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=torch.float64).view(1, -1, 1, 1)  # the reference then rounds to float32


def align(*lists):
    n = min(len(x) for x in lists)
    return [x[-n:] for x in lists]


def ref_ofd_loss(feature_student, feature_teacher, connectors, margins):
    feature_student, feature_teacher = align(feature_student, feature_teacher)
    feature_student = [connectors[i](f) for i, f in enumerate(feature_student)]
    loss, n = 0, len(feature_student)
    for i in range(n):
        loss = loss + ref_feat_loss(
            feature_student[i], F.adaptive_avg_pool2d(feature_teacher[i], feature_student[i].shape[-2:]).detach(),
            margins[i]) / 2 ** (n - i - 1)
    return loss


def overhaul_loss(source, target, margin):
    """clovaai/overhaul-distillation CIFAR-100/distiller.py `distillation_loss`, per batch sample."""
    target = torch.max(target, margin)
    loss = F.mse_loss(source, target, reduction="none") * ((source > target) | (target > 0)).float()
    return loss.sum() / source.shape[0]


# mdistiller's get_stage_channels() and get_bn_before_relu() for the models of the three pairs.
REF_STAGE_CHANNELS = {"resnet32x4": [32, 64, 128, 256], "resnet8x4": [32, 64, 128, 256],
                      "ShuffleV2": [24, 116, 232, 464], "vgg13": [64, 128, 256, 512, 512],
                      "MobileNetV2": [16, 12, 16, 48, 160]}
REF_BN_BEFORE_RELU = {
    "resnet32x4": lambda t: [t.layer1[-1].bn2, t.layer2[-1].bn2, t.layer3[-1].bn2],
    "vgg13": lambda t: [t.block1[-1], t.block2[-1], t.block3[-1], t.block4[-1]],
}


# ------------------------------------------------------------------ the margin
def test_margin_by_hand():
    w = torch.tensor([1.0, 2.0, 1.0, 0.5])
    b = torch.tensor([0.0, -10.0, 4.0, 0.2])
    m = ofd_margin(w, b)
    assert m.dtype == torch.float64
    assert m[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-14)  # E[x | x < 0], x ~ N(0, 1)
    assert m[1].item() == pytest.approx(-10 - 2 * math.exp(-12.5) / math.sqrt(2 * math.pi) / norm.cdf(5), rel=1e-14)
    assert m[2].item() == -3.0  # P(x < 0) = Phi(-4) < 0.001
    # Truncated normal mean, by numerical integration of x over the negative half of N(0.2, 0.25).
    x = torch.linspace(-6.0, 0.0, 200001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((x - 0.2) / 0.5) ** 2)
    assert m[3].item() == pytest.approx((torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x)).item(), rel=1e-7)
    assert ofd_margin(-w, b).tolist() == m.tolist()  # |weight|: a negative scale is the same spread


def test_margin_of_a_zero_scale_is_its_limit():
    # The reference divides by zero here; kdlab takes the point mass's limit.
    m = ofd_margin(torch.zeros(3), torch.tensor([-1.5, 0.0, 2.0]))
    assert m.tolist() == [-1.5, 0.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 5.0), st.booleans(), st.floats(-8.0, 8.0)), min_size=1, max_size=16))
def test_margin_matches_mdistiller(channels):
    weight = torch.tensor([s if pos else -s for s, pos, _ in channels], dtype=torch.float64)
    bias = torch.tensor([m for *_, m in channels], dtype=torch.float64)
    bn = nn.BatchNorm2d(len(channels)).double()
    bn.weight.data.copy_(weight)
    bn.bias.data.copy_(bias)
    mine = ofd_margin(weight, bias)
    torch.testing.assert_close(mine, ref_margin(bn).flatten(), rtol=1e-11, atol=1e-12)
    assert (mine <= 0).all()


# ------------------------------------------------------------------ the partial L2
def test_partial_l2_by_hand():
    s = torch.tensor([[1.0, -2.0], [-1.0, 0.5]]).view(2, 1, 1, 2)
    t = torch.tensor([[0.5, -3.0], [-0.5, -2.0]]).view(2, 1, 1, 2)
    # sample 0: T = (0.5, -1): 0.5^2, then S = -2 <= T = -1 <= 0 skipped;
    # sample 1: T = (-0.5, -1): S = -1 <= -0.5 <= 0 skipped, then (0.5 + 1)^2. Mean over the 2 samples.
    assert partial_l2(s, t, torch.tensor([-1.0])).item() == pytest.approx((0.25 + 2.25) / 2)
    # Two stages: the shallow one weighs 1/2.
    assert ofd_loss([s, s], [t, t], [torch.tensor([-1.0])] * 2).item() == pytest.approx(1.5 * 1.25)


def random_stage(g, n, c, h, w, dtype=torch.float64):
    s = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    t = torch.randn(n, c, 2 * h if h < 3 else h, 2 * w if w < 3 else w, generator=g, dtype=dtype)
    m = -torch.rand(1, c, 1, 1, generator=g, dtype=dtype) * 2
    return s, t, m


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), stages=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_loss_and_gradients_match_mdistiller(n, stages, seed, scale):
    g = torch.Generator().manual_seed(seed)
    parts = [random_stage(g, n, c, h, h) for c, h in stages]
    students = [(scale * s).requires_grad_(True) for s, _, _ in parts]
    teachers = [scale * t for _, t, _ in parts]
    margins = [scale * m for *_, m in parts]
    mine = ofd_loss(students, teachers, margins)
    ref = ref_ofd_loss(students, teachers, [lambda x: x] * len(parts), margins)
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(mine, students), torch.autograd.grad(ref, students)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The OFD authors' own form (same sizes, margins <= 0) gives the same stage terms.
    for s, t, m in zip(students, teachers, margins):
        if s.shape == t.shape:
            torch.testing.assert_close(partial_l2(s, t, m), overhaul_loss(s, t, m), rtol=1e-12, atol=1e-12)


def test_gradient_check_and_constant_teacher():
    g = torch.Generator().manual_seed(0)
    s1, t1, m1 = random_stage(g, 2, 3, 4, 4)
    s2, t2, m2 = random_stage(g, 2, 5, 2, 2)  # teacher 4x4, pooled to the student's 2x2
    s1.requires_grad_(True)
    s2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ofd_loss([a, b], [t1, t2], [m1, m2]), (s1, s2))
    t = t1.clone().requires_grad_(True)
    partial_l2(s1, t, m1).backward()
    assert t.grad is None  # the teacher is a constant


def test_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        partial_l2(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="as many"):
        ofd_loss([torch.zeros(2, 3, 4, 4)], [], [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_float32_where_half_precision_overflows(dtype):
    s = torch.full((2, 3, 4, 4), 1000.0, dtype=dtype)  # squares (1e6) overflow float16
    value = partial_l2(s, torch.zeros_like(s), torch.full((3,), -1.0))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(1e6 * 48)  # 48 elements a sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = nn.Conv2d(3, 3, 1)
        out = ofd_loss([conv(s.float() * 100)], [torch.zeros(2, 3, 8, 8)], [torch.full((3,), -1.0)])
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ------------------------------------------------------------------ the three CIFAR pairs
def randomise_batch_norms(model: nn.Module, seed: int) -> None:
    """Trained-looking affine parameters and statistics, so that every margin differs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.randn(c, generator=g) * 0.8
            m.bias.data = torch.randn(c, generator=g) * 1.5
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = torch.rand(c, generator=g) + 0.5


def build(teacher: str, student: str, classes: int = 100, **cfg) -> OFD:
    torch.manual_seed(0)
    t = create_model(teacher, classes)
    randomise_batch_norms(t, 1)
    cls = method_class("ofd")
    return cls(create_model(student, classes), t, cls.Config(**cfg), input_size=(3, 32, 32), num_classes=classes)


@pytest.fixture(scope="module")
def pairs() -> dict[tuple[str, str], OFD]:
    return {pair: build(*pair) for pair in THREE_PAIRS}


def shuffle_permutation(c: int) -> torch.Tensor:
    """kdlab's ShuffleV2 pre-activation p is mdistiller's q with the channel shuffle applied:
    p[:, i] = q[:, perm[i]]."""
    return channel_shuffle(torch.arange(c, dtype=torch.float64).view(1, c, 1, 1)).flatten().long()


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_reference_stages_batch_norms_and_connectors(pairs, teacher, student):
    d = pairs[(teacher, student)]
    t_channels, s_channels = align(REF_STAGE_CHANNELS[teacher][1:], REF_STAGE_CHANNELS[student][1:])
    n = len(t_channels)
    assert d.student_indices == d.teacher_indices == list(range(n))
    for conn, cin, cout in zip(d.connectors, s_channels, t_channels):
        conv, bn = conn
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (cin, cout, (1, 1), (0, 0))
        assert conv.bias is None and isinstance(bn, nn.BatchNorm2d) and bn.num_features == cout
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / cout), rel=0.25)  # N(0, 2 / (k^2 C_out))
    ref_bns = REF_BN_BEFORE_RELU[teacher](d.teacher)
    assert all(a is b for a, b in zip(bn_before_relu(d.teacher), ref_bns))
    assert len(d.margins) == n
    for mine, bn in zip(d.margins, ref_bns[-n:]):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, ref_margin(bn).float(), rtol=0, atol=0)


@pytest.mark.parametrize("teacher, student", THREE_PAIRS)
def test_loss_and_gradients_equal_mdistiller_on_the_pair(pairs, teacher, student):
    d = copy.deepcopy(pairs[(teacher, student)]).double()
    d.train()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    batch = Batch(images, torch.randint(0, 100, (4,), generator=g))
    params = [p for name, p in d.student.named_parameters() if not name.startswith(("fc.", "linear.", "classifier."))]
    mine = d.forward_train(batch, 1).losses["ofd"]
    my_grads = torch.autograd.grad(mine, params + [c[0].weight for c in d.connectors], allow_unused=True)

    # mdistiller: the teacher in training mode (OFD.train), its preact_feats[1:], the student's.
    teacher_copy = copy.deepcopy(d.teacher).train()
    with torch.no_grad():
        t_feats = teacher_copy(images, features=True)[1].preact_stages
    s_feats = list(d.student(images, features=True)[1].preact_stages)
    connectors = copy.deepcopy(d.connectors)
    if student == "ShuffleV2":  # mdistiller's preact is the unshuffled concat; the 1x1 conv absorbs the order
        for i, (f, conn) in enumerate(zip(s_feats, connectors)):
            perm = shuffle_permutation(f.shape[1])
            q = torch.empty_like(f)
            q[:, perm] = f
            s_feats[i] = q
            w = conn[0].weight.data.clone()
            conn[0].weight.data[:, perm] = w
    margins = [ref_margin(bn).float() for bn in REF_BN_BEFORE_RELU[teacher](d.teacher)]  # torch.FloatTensor
    ref = 0.001 * ref_ofd_loss(s_feats, t_feats, connectors, margins)
    ref_grads = torch.autograd.grad(ref, params + [c[0].weight for c in connectors], allow_unused=True)
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    n_student = len(params)
    assert sum(a is not None for a in my_grads[:n_student]) > n_student // 2  # the stem and the stages
    for a, b in zip(my_grads[:n_student], ref_grads[:n_student]):
        assert (a is None) == (b is None)  # layers after the last distilled stage get none from this term
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b, f in zip(my_grads[n_student:], ref_grads[n_student:], s_feats):
        if student == "ShuffleV2":
            b = b[:, shuffle_permutation(f.shape[1])]
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("teacher, pre_minus_bn", [
    ("resnet32x4", lambda t, block_input: block_input),  # the residual sum: bn2 output + identity shortcut
    ("vgg13", lambda t, block_input: 0),  # the block's last BN output itself
])
def test_the_batch_norms_feed_the_pre_activations(pairs, teacher, pre_minus_bn):
    t = next(d for (name, _), d in pairs.items() if name == teacher).teacher
    bns = bn_before_relu(t)
    seen: dict[int, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, out)) for k, bn in enumerate(bns)]
    inputs: dict[int, torch.Tensor] = {}
    if teacher == "resnet32x4":
        # The last block's input is the output of the one before (the last runs through forward_preact).
        hooks += [layer[-2].register_forward_hook(lambda m, a, out, k=k: inputs.__setitem__(k, out))
                  for k, layer in enumerate([t.layer1, t.layer2, t.layer3])]
    with torch.no_grad():
        feats = t(torch.randn(2, 3, 32, 32), features=True)[1]
    for h in hooks:
        h.remove()
    for k, pre in enumerate(feats.preact_stages):
        torch.testing.assert_close(pre - pre_minus_bn(t, inputs.get(k)), seen[k])


def test_other_families_and_unknown_ones():
    wrn = create_model("wrn_16_1", 10)
    assert bn_before_relu(wrn) == [wrn.block2.layer[0].bn1, wrn.block3.layer[0].bn1, wrn.bn1]
    mv2 = create_model("MobileNetV2", 10)
    assert bn_before_relu(mv2) == [mv2.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]  # mdistiller's
    r18 = create_model("ResNet18", 10)
    assert bn_before_relu(r18) == [getattr(r18, f"layer{i}")[-1].bn2 for i in (1, 2, 3, 4)]
    mv1 = create_model("MobileNetV1", 10)
    assert bn_before_relu(mv1) == [mv1.model[i][-2] for i in (3, 5, 11, 13)]  # mdistiller imagenet/mobilenetv1.py
    tv = create_model("tv:resnet18", 10)
    assert bn_before_relu(tv) == [tv.net.get_submodule(f"layer{i}.1.bn2") for i in (1, 2, 3, 4)]
    with torch.no_grad():  # the BN output, plus the block's input, is the pre-activation
        seen = {}
        h = bn_before_relu(wrn)[0].register_forward_hook(lambda m, a, out: seen.setdefault("bn", out))
        feats = wrn(torch.randn(2, 3, 32, 32), features=True)[1]
        h.remove()
        torch.testing.assert_close(feats.preact_stages[0], seen["bn"])
    for name, label in (("ShuffleV2", "ShuffleNetV2"), ("ShuffleV1", "ShuffleNetV1"), ("densenet100_bc", "DenseNetBC")):
        with pytest.raises(ConfigError, match=f"model {label}"):
            bn_before_relu(create_model(name, 10))


# ------------------------------------------------------------------ the method
def test_trains_through_the_protocol_with_the_teacher_frozen(pairs):
    d = copy.deepcopy(pairs[("resnet32x4", "resnet8x4")])
    assert d.needs_teacher_features and d.requires_teacher and not d.needs_sample_indices
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for p in d.connectors.parameters())
    assert not any(id(p) in trainable for p in d.teacher.parameters())
    extra = d.extra_state_dict()
    assert extra and all(k.startswith("connectors.") for k in extra)  # margins are rebuilt from the teacher
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    conn_before = {k: v.clone() for k, v in d.connectors.state_dict().items()}
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    d.train()
    for step in (1, 2):
        batch = Batch(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g))
        out = d(batch, step)
        assert set(out.losses) == {"ce", "ofd"} and out.logits.shape == (4, 100)
        torch.testing.assert_close(out.losses["ofd"].detach(), 0.001 * out.stats["ofd_distance"])
        opt.zero_grad()
        sum(out.losses.values()).backward()
        assert all(p.grad is None for p in d.teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connectors.parameters())
        opt.step()
    for k, v in d.teacher.state_dict().items():  # weights and running statistics
        torch.testing.assert_close(v, teacher_before[k])
    assert any(not torch.equal(v, conn_before[k]) for k, v in d.connectors.state_dict().items())
    assert not d.teacher.training
    assert all(not m.training and m.track_running_stats for m in d.teacher.modules() if isinstance(m, nn.BatchNorm2d))


def test_teacher_statistics_batch_or_running(pairs):
    d = copy.deepcopy(pairs[("vgg13", "MobileNetV2")])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        batch_mode = d.teacher_preacts(images)[1]
        train_copy = copy.deepcopy(d.teacher).train()  # what both reference codes run
        torch.testing.assert_close(batch_mode, train_copy(images, features=True)[1].preact_stages)
        d.cfg = OFDConfig(teacher_bn="running")
        running = d.teacher_preacts(images)[1]
        torch.testing.assert_close(running, d.teacher(images, features=True)[1].preact_stages)
    assert not torch.allclose(batch_mode[0], running[0])
    bn = nn.BatchNorm2d(2).eval()
    with batch_statistics([bn]):
        assert bn.training and not bn.track_running_stats
        bn(torch.randn(4, 2, 3, 3) + 5)
    assert not bn.training and bn.track_running_stats and bn.running_mean.abs().max() == 0


def test_stage_choices():
    d = build("vgg13", "resnet8", classes=10)  # teacher 4 stages, student 3: the teacher's deepest 3
    assert d.student_indices == [0, 1, 2] and d.teacher_indices == [1, 2, 3]
    torch.testing.assert_close(d.margins[0], ref_margin(d.teacher.block2[-1]).float())
    d = build("resnet32x4", "resnet8x4", student_stages=[2, 3])
    assert d.student_indices == d.teacher_indices == [1, 2] and len(d.connectors) == 2
    d = build("resnet32x4", "resnet8x4", student_stages=[1], teacher_stages=[2])
    assert (d.connectors[0][0].in_channels, d.connectors[0][0].out_channels) == (64, 128)
    with pytest.raises(ConfigError, match=r"student has stages 1\.\.3"):
        build("resnet32x4", "resnet8x4", student_stages=[4])
    with pytest.raises(ConfigError, match="different lengths"):
        build("resnet32x4", "resnet8x4", student_stages=[1, 2], teacher_stages=[3])
    with pytest.raises(ConfigError, match="connector_kernel=2 must be odd"):
        build("resnet8", "resnet8", classes=10, connector_kernel=2)
    d = build("resnet8", "resnet8", classes=10, connector_kernel=3)
    assert d.connectors[0][0].kernel_size == (3, 3) and d.connectors[0][0].padding == (1, 1)


def test_refuses_a_teacher_without_known_batch_norms():
    with pytest.raises(ConfigError, match=r"OFD cannot distil from this teacher \(student CifarResNet, teacher "
                                          r"ShuffleNetV2\).*batch norm before each"):
        build("ShuffleV2", "resnet8", classes=10)


def test_mixed_precision_step_is_finite():
    d = build("resnet8", "resnet8", classes=10)
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d.forward_train(Batch(torch.randn(4, 3, 32, 32) * 50, torch.randint(0, 10, (4,))), 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


# ------------------------------------------------------------------ configs and rows
def test_every_cifar_config_loads_with_mdistillers_settings():
    for cfg in cifar_configs("ofd", CRD_PAIRS):
        m = cfg.method
        assert (m.ce_weight, m.feat_weight, m.connector_kernel, m.teacher_bn) == (1.0, 0.001, 1, "batch")
        assert m.student_stages is None and m.teacher_stages is None


def test_imagenet_configs_and_their_stages():
    r34 = load_config(ROOT / "configs" / "imagenet" / "ofd" / "resnet34_resnet18.yaml")
    r50 = load_config(ROOT / "configs" / "imagenet" / "ofd" / "resnet50_MobileNetV1.yaml")
    for cfg in (r34, r50):
        assert (cfg.method.feat_weight, cfg.method.student_stages, cfg.method.teacher_stages) == (1e-4, [2, 3, 4], [2, 3, 4])
        assert cfg.train.epochs == 100 and cfg.schedule.milestones == [30, 60, 90]
    assert (r50.data.batch_size, r50.optim.lr) == (128, 0.05)  # mdistiller r50_mv1/ofd.yaml
    assert (r34.data.batch_size, r34.optim.lr) == (512, 0.2)
    assert (r50.teacher.name, r50.model.name, r34.teacher.name, r34.model.name) == (
        "tv:resnet50", "MobileNetV1", "tv:resnet34", "tv:resnet18")
    cls = method_class("ofd")
    t = create_model("tv:resnet34", 10)
    d = cls(create_model("tv:resnet18", 10), t, r34.method, input_size=(3, 64, 64), num_classes=10)
    assert d.student_indices == d.teacher_indices == [1, 2, 3]
    assert [(c[0].in_channels, c[0].out_channels) for c in d.connectors] == [(128, 128), (256, 256), (512, 512)]
    bns = [t.net.get_submodule(f"layer{i}.{n}.bn2") for i, n in ((2, 3), (3, 5), (4, 2))]  # mdistiller's list
    for mine, bn in zip(d.margins, bns):
        torch.testing.assert_close(mine, ref_margin(bn).float())


def test_reproduce_rows_have_no_published_numbers():
    from kdlab.reproduce.table import load_rows

    rows = {r.id: r for r in load_rows() if r.method == "ofd"}
    assert set(rows) == {f"ofd/cifar100/{p}" for p in CRD_PAIRS} | {
        "ofd/imagenet/resnet34_resnet18", "ofd/imagenet/resnet50_MobileNetV1"}
    for row in rows.values():
        assert row.published is None and "unknown" in row.note and row.metric == "top1"
        assert (ROOT / row.config).is_file()
        assert row.teacher_config is None or (ROOT / row.teacher_config).is_file()


@pytest.mark.slow
def test_trains_end_to_end_through_the_engine(make_config, tmp_path):
    """`kdlab train` with method ofd: the term is logged and the connectors checkpointed."""
    from kdlab.engine.checkpoint import Checkpoint  # lazy: only this test reads a checkpoint

    rows, run = train_teacher_then({"name": "ofd"}, make_config, tmp_path)
    row = rows[-1]
    assert row["train/ofd"] == pytest.approx(0.001 * row["stat/ofd_distance"], rel=1e-5) and row["train/ofd"] > 0
    extra = Checkpoint.load(run / "last.pt").extra_state
    assert extra and all(k.startswith("connectors.") for k in extra)
