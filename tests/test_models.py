"""The model zoo: registry, benchmark parameter counts, and the stage-feature contract."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.models import FeatureClassifier, Features, create_model, feature_info, list_models
from kdlab.registry import UnknownNameError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small batches gain little from intra-op threads, and a shared 2-core machine loses a
    lot to oversubscription; restore the setting for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: parameter counts (millions, 3 decimals) at 100 classes: RepDistiller / mdistiller values
PARAMS_M = {
    "resnet8": 0.084, "resnet14": 0.181, "resnet20": 0.278, "resnet32": 0.473,
    "resnet44": 0.667, "resnet56": 0.862, "resnet110": 1.737,
    "resnet8x4": 1.234, "resnet32x4": 7.434,
    "wrn_16_1": 0.181, "wrn_16_2": 0.703, "wrn_40_1": 0.570, "wrn_40_2": 2.255,
    "vgg8": 3.965, "vgg11": 9.277, "vgg13": 9.462, "vgg16": 14.774, "vgg19": 20.087,
    "ResNet18": 11.220, "ResNet34": 21.328, "ResNet50": 23.705,
    "MobileNetV2": 0.813, "ShuffleV1": 0.949, "ShuffleV2": 1.356,
    # no benchmark table: the ImageNet model's 1000-class count is checked separately;
    # DenseNet-BC are the paper's 0.8M / 25.6M (at 10 classes, see test below)
    "MobileNetV1": 3.309, "densenet100_bc": 0.800, "densenet190_bc": 25.822,
}

#: input side for the forward tests (small where the model allows it, to stay fast)
INPUT_SIDE = {"MobileNetV1": 64, "densenet190_bc": 16}

#: stage counts per model (mdistiller's `feats[1:]`)
NUM_STAGES = {"ResNet18": 4, "ResNet34": 4, "ResNet50": 4, "MobileNetV2": 4, "MobileNetV1": 4,
              **{f"vgg{d}": 4 for d in (8, 11, 13, 16, 19)}}

#: models whose stages end in a linear layer: preact_stages are the stages themselves
LINEAR_STAGE_END = {"MobileNetV2"}

#: pre-activation families: raw_stages are the block outputs, before the BN and ReLU that
#: the next stage (or the head) applies; everywhere else raw_stages are the stages
PREACT_FAMILIES = {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "densenet100_bc", "densenet190_bc"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def head(model: nn.Module) -> nn.Module:
    return model.get_classifier()


def test_zoo_registers_every_benchmark_model():
    missing = set(PARAMS_M) - set(list_models())
    assert not missing, f"not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_count_at_100_classes(name):
    model = create_model(name, num_classes=100)
    assert isinstance(model, FeatureClassifier)
    assert round(n_params(model) / 1e6, 3) == pytest.approx(PARAMS_M[name], abs=1e-9)


def test_imagenet_mobilenetv1_params_and_input_size():
    model = create_model("MobileNetV1", num_classes=1000)
    assert round(n_params(model) / 1e6, 2) == 4.23
    assert model.default_input_size == (3, 224, 224)
    info = feature_info(model)  # default 224x224 input
    assert [(s.channels, s.height) for s in info.stages] == [(128, 56), (256, 28), (512, 14), (1024, 7)]
    assert info.pooled_dim == 1024 and info.num_classes == 1000


def test_densenet_bc_matches_paper_counts():
    # Huang et al. report C10 (10-class) sizes: 0.8M (L=100, k=12) and 25.6M (L=190, k=40)
    assert round(n_params(create_model("densenet100_bc", num_classes=10)) / 1e6, 1) == 0.8
    assert round(n_params(create_model("densenet190_bc", num_classes=10)) / 1e6, 1) == 25.6


def _check_features(name: str, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, feats: Features):
    b = x.shape[0]
    assert isinstance(feats, Features)
    assert len(feats.stages) == len(feats.preact_stages) == len(feats.raw_stages) == NUM_STAGES.get(name, 3)
    for s, p, r in zip(feats.stages, feats.preact_stages, feats.raw_stages):
        assert s.dim() == 4 and s.shape[0] == b
        assert p.shape == s.shape == r.shape
    # shallow to deep: spatial size never grows
    sides = [s.shape[-1] for s in feats.stages]
    assert sides == sorted(sides, reverse=True)
    assert feats.stem is not None and feats.stem.dim() == 4 and feats.stem.shape[0] == b
    assert feats.pooled.dim() == 2 and feats.pooled.shape[0] == b
    torch.testing.assert_close(head(model)(feats.pooled), logits)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_forward_features_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    side = INPUT_SIDE.get(name, 32)
    x = torch.randn(2, 3, side, side)

    # eval mode: plain forward == feature forward; head(pooled) reproduces the logits
    model.eval()
    with torch.no_grad():
        logits, feats = model(x, features=True)
        plain = model(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 10)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    _check_features(name, model, x, logits, feats)

    # feature_info agrees with the tensors and leaves the training mode alone
    model.train()
    info = feature_info(model, input_size=(3, side, side))
    assert model.training
    for kind in ("stages", "preact_stages", "raw_stages"):
        assert [(s.channels, s.height, s.width) for s in getattr(info, kind)] == [
            tuple(t.shape[1:]) for t in getattr(feats, kind)], kind
    assert info.pooled_dim == feats.pooled.shape[1] and info.num_classes == 10

    # pre-activations are real pre-activations
    for i, (s, p) in enumerate(zip(feats.stages, feats.preact_stages)):
        if name in LINEAR_STAGE_END:
            assert torch.equal(p, s)
        else:
            assert (p < 0).any(), f"{name} preact stage {i} has no negative entry"
            assert (s >= 0).all(), f"{name} stage {i} is not post-ReLU"
            torch.testing.assert_close(torch.relu(p), s, rtol=0, atol=0)

    # raw stages: the block outputs before a following BN + ReLU in pre-activation
    # families (with negatives, not equal to the pre-activation), the stages elsewhere
    for s, p, r in zip(feats.stages, feats.preact_stages, feats.raw_stages):
        if name in PREACT_FAMILIES:  # (fresh batch-norms are identities in eval mode: the
            assert (r < 0).any() and r is not p  # values are compared in the WRN test below)
        else:
            assert r is s

    # nothing later writes into returned features: backward, then a second forward
    model.train()
    logits, feats = model(x, features=True)
    returned = feats.preact_stages + feats.stages + feats.raw_stages
    held = [t.detach().clone() for t in returned]
    versions = [t._version for t in returned]
    (logits.square().mean() + sum(p.mean() for p in feats.preact_stages + feats.raw_stages)).backward()
    model(torch.randn_like(x), features=True)
    for t, h, v in zip(returned, held, versions):
        assert t._version == v
        assert torch.equal(t.detach(), h)


def test_no_inplace_relu_modules():
    for name in ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "MobileNetV1", "ShuffleV1", "ResNet18"):
        for m in create_model(name).modules():
            if isinstance(m, nn.ReLU):
                assert not m.inplace, name


def test_vgg_uses_pool3_for_64px_inputs():
    model = create_model("vgg8", num_classes=10).eval()
    with torch.no_grad():
        _, f32 = model(torch.randn(2, 3, 32, 32), features=True)
        _, f64 = model(torch.randn(2, 3, 64, 64), features=True)
    assert [t.shape[-1] for t in f32.stages] == [16, 8, 4, 4]
    assert [t.shape[-1] for t in f64.stages] == [32, 16, 8, 4]


def test_state_dict_names_follow_reference():
    # the reference module names, so RepDistiller/mdistiller checkpoints load directly
    expect = {
        "resnet32x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.4.bn2.running_var", "fc.bias"],
        "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"],
        "vgg13": ["block0.3.weight", "block4.4.running_mean", "classifier.weight"],
        "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"],
        "MobileNetV2": ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"],
        "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
        "ShuffleV2": ["layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "bn2.weight"],
        "MobileNetV1": ["model.0.0.weight", "model.13.4.running_var", "fc.weight"],
    }
    for name, keys in expect.items():
        sd = create_model(name).state_dict()
        for k in keys:
            assert k in sd, f"{name}: missing {k}"


def test_unknown_model_name_suggests_closest():
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet32x5")
    msg = str(err.value)
    assert "Did you mean" in msg and "'resnet32x4'" in msg
    assert "wrn_40_2" in msg and "ShuffleV2" in msg  # lists valid names
    with pytest.raises(KeyError):
        create_model("no_such_model_at_all")


@torch.no_grad()
def test_wrn_raw_stages_are_the_block_outputs_and_preact_is_the_consuming_bn():
    """Recomputed independently: forward hooks on the last BasicBlock of block1..block3
    give the raw stage outputs (the residual sums, mdistiller's and the official ReviewKD
    code's `feats`). (kdlab's forward runs each stage's first block through
    `forward_activated`, so hooks on the NetworkBlocks themselves would not fire.)"""
    torch.manual_seed(0)
    model = create_model("wrn_16_2", num_classes=10)
    for m in model.modules():  # batch-norms that are not identities, so bn(f) != f
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_(-1, 1)
    seen = {}
    assert len(model.block1.layer) >= 2
    hooks = [getattr(model, f"block{i}").layer[-1].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out.clone())) for i in (1, 2, 3)]
    x = torch.randn(4, 3, 32, 32)
    # eval mode: the batch-norms below then use the same (running) statistics
    model.eval()
    logits = model(x)  # plain forward: the reference's path through block1..block3
    _, feats = model(x, features=True)
    for h in hooks:
        h.remove()
    consuming_bn = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    for i, (r, p, s, bn) in enumerate(zip(feats.raw_stages, feats.preact_stages, feats.stages, consuming_bn)):
        torch.testing.assert_close(r, seen[i + 1], rtol=0, atol=0)
        assert not torch.allclose(r, p) and not torch.allclose(r, s)
        torch.testing.assert_close(p, bn(seen[i + 1]))
        torch.testing.assert_close(s, torch.relu(bn(seen[i + 1])))
    torch.testing.assert_close(model.fc(feats.pooled), logits)


def test_features_fill_raw_stages_and_check_lengths():
    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)
    feats = Features([a, b], [a, b], torch.randn(1, 2))
    assert feats.raw_stages == [a, b]  # not given: the stages
    with pytest.raises(ValueError, match="raw_stages"):
        Features([a, b], [a, b], torch.randn(1, 2), raw_stages=[a])
