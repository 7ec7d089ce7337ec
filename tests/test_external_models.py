"""torchvision / timm / custom models as teachers and students (kdlab/models/torchvision_models.py,
timm_models.py, adapter.py, capture.py, weights.py).

timm is optional: only the tests marked `needs_timm` skip without it; the torchvision,
adapter, weight-loading and missing-timm tests run either way."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdlab.methods.base import Batch
from kdlab.errors import CheckpointError, ConfigError
from kdlab.models import FeatureClassifier, create_model, feature_info

CUSTOM = str(Path(__file__).with_name("custom_nets.py"))
try:
    import timm
except ImportError:
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="the optional package timm is not installed")


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    return create_model("tv:resnet18", num_classes=10).eval()


# ------------------------------------------------------------------ in-place safety
@torch.no_grad()
def test_resnet_preactivation_is_intact_while_a_naive_hook_is_corrupted(tv_resnet18):
    torch.manual_seed(0)
    naive = torchvision.models.resnet18(num_classes=10).eval()  # torchvision as shipped: inplace ReLUs
    # same weights in ours: the extractor keeps torchvision's module names
    tv_resnet18.net.load_state_dict(naive.state_dict())
    block = naive.layer1[1]
    seen = {}

    def naive_hook(module, inputs, output):
        seen["bn2"] = output  # a reference, as most hook-based extractors keep

    handle = block.bn2.register_forward_hook(naive_hook)
    x = torch.randn(2, 3, 64, 64)
    naive(x)
    handle.remove()

    # the truth, recomputed without any in-place op
    stem = naive.maxpool(F.relu(naive.bn1(naive.conv1(x))))
    b0 = naive.layer1[0](stem)
    true_bn2 = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(b0)))))
    true_pre = true_bn2 + b0

    # torchvision's `out += identity; relu(out)` overwrote the hooked tensor in place
    assert (true_bn2 < 0).any()
    assert (seen["bn2"] >= 0).all()
    torch.testing.assert_close(seen["bn2"], F.relu(true_pre))

    logits, feats = tv_resnet18(x, features=True)
    torch.testing.assert_close(logits, naive(x))
    pre, post = feats.preact_stages[0], feats.stages[0]
    assert (pre < 0).any(), "the pre-activation must keep its negative values"
    torch.testing.assert_close(pre, true_pre)
    torch.testing.assert_close(post, F.relu(true_pre))
    # every stage: post = relu(pre) exactly, pre has negatives
    for p, s in zip(feats.preact_stages, feats.stages):
        assert (p < 0).any()
        torch.testing.assert_close(s, F.relu(p))


# ------------------------------------------------------------------ the feature contract
@pytest.mark.parametrize("name,kwargs,preact_differs,pooled", [
    ("tv:mobilenet_v3_small", {}, [False, False, False, True], 576),  # linear bottlenecks; the last block ends in Hardswish
    pytest.param("timm:convnext_atto", {}, [False] * 4, 320,          # a ConvNeXt stage ends with the residual add
                 marks=needs_timm),
    pytest.param("timm:resnet18", {"zero_init_last": False}, [True] * 4, 512,  # pre = input of the block's act2
                 marks=needs_timm),
])
def test_external_models_follow_the_feature_contract(name, kwargs, preact_differs, pooled):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).eval()
    assert isinstance(model, FeatureClassifier)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x, features=True)
        torch.testing.assert_close(logits, model(x))
    assert logits.shape == (2, 10)
    assert len(feats.stages) == 4
    sides = [s.shape[-1] for s in feats.stages]
    assert sides == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    assert [not torch.equal(p, s) for p, s in zip(feats.preact_stages, feats.stages)] == preact_differs
    assert feats.pooled.shape == (2, pooled)
    info = feature_info(model, (3, 64, 64))
    assert [s.channels for s in info.stages] == [s.shape[1] for s in feats.stages]
    assert [s.channels for s in info.preact_stages] == [s.shape[1] for s in feats.preact_stages]
    assert feats.raw_stages == feats.stages  # no post-stage normalisation is looked for here
    # a deep copy (EMA, generations) captures its own features, not the original's
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
        c_logits, c_feats = clone(x, features=True)
    assert not torch.allclose(c_logits, logits)
    for p, s in zip(c_feats.preact_stages, c_feats.stages):
        assert p.shape == s.shape
    assert [not torch.equal(p, s) for p, s in zip(c_feats.preact_stages, c_feats.stages)] == preact_differs


@needs_timm
def test_timm_stage_capture_uses_the_final_activation():
    model = create_model("timm:resnet18", num_classes=10, zero_init_last=False)
    assert model.stage_modules == ["layer1", "layer2", "layer3", "layer4"]
    assert model.preact_modules == [f"layer{i}.1.act2" for i in range(1, 5)]
    _, feats = model(torch.randn(2, 3, 32, 32), features=True)
    for p, s in zip(feats.preact_stages, feats.stages):
        assert (p < 0).any()
        torch.testing.assert_close(s, F.relu(p))


# ------------------------------------------------------------------ weights from local files
def test_local_weights_load_in_pth_and_safetensors_formats(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = torchvision.models.mobilenet_v3_small(num_classes=5)
    state = src.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")  # wrapped, DDP prefix
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        model = create_model("tv:mobilenet_v3_small", num_classes=5, weights=str(tmp_path / file))
        loaded = model.net.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_weights_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; kdlab never downloads"):
        create_model("tv:mobilenet_v3_small", num_classes=5, weights=str(tmp_path / "absent.pth"))
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=7).state_dict(), tmp_path / "c7.pth")
    with pytest.raises(CheckpointError, match=r"classifier\.3\.weight \(7, 1024\) vs \(5, 1024\).*reset_head=true"):
        create_model("tv:mobilenet_v3_small", num_classes=5, weights=str(tmp_path / "c7.pth"))
    torch.save(torchvision.models.squeezenet1_0(num_classes=5).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"does not fit model 'tv:mobilenet_v3_small': missing: features\.0\.0\.weight"):
        create_model("tv:mobilenet_v3_small", num_classes=5, weights=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth' is corrupt or truncated"):
        create_model("tv:mobilenet_v3_small", num_classes=5, weights=str(tmp_path / "junk.pth"))


def test_reset_head_keeps_the_backbone_and_starts_a_fresh_head(tmp_path):
    torch.manual_seed(2)
    src = torchvision.models.mobilenet_v3_small(num_classes=7)
    torch.save(src.state_dict(), tmp_path / "c7.pth")
    model = create_model("tv:mobilenet_v3_small", num_classes=3, weights=str(tmp_path / "c7.pth"), reset_head=True)
    got = model.net.state_dict()
    assert torch.equal(got["features.0.0.weight"], src.state_dict()["features.0.0.weight"])
    assert torch.equal(got["classifier.0.weight"], src.state_dict()["classifier.0.weight"])  # hidden layer kept
    assert got["classifier.3.weight"].shape == (3, 1024)


@needs_timm
def test_timm_weights_and_reset_head(tmp_path):
    src = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    torch.save(src.state_dict(), tmp_path / "atto.pth")
    model = create_model("timm:convnext_atto", num_classes=4, weights=str(tmp_path / "atto.pth"))
    assert torch.equal(model.net.stem[0].weight, src.stem[0].weight)
    with pytest.raises(CheckpointError, match="reset_head=true"):
        create_model("timm:convnext_atto", num_classes=2, weights=str(tmp_path / "atto.pth"))
    model = create_model("timm:convnext_atto", num_classes=2, weights=str(tmp_path / "atto.pth"), reset_head=True)
    assert model.net.head.fc.weight.shape == (2, 320)


# ------------------------------------------------------------------ names and the optional timm
@needs_timm
def test_unknown_timm_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown timm model 'timm:convnext_atoo'.*convnext_atto"):
        create_model("timm:convnext_atoo", num_classes=10)
    with pytest.raises(ConfigError, match="never downloads"):
        create_model("timm:convnext_atto", num_classes=10, pretrained=True)


def test_unknown_names_and_missing_timm_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"Did you mean tv:resnet18\?"):
        create_model("tv:resnet19", num_classes=10)
    with pytest.raises(ConfigError, match="never downloads"):
        create_model("tv:resnet18", num_classes=10, pretrained=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the optional package timm.*pip install 'kdlab\[timm\]'"):
        create_model("timm:convnext_atto", num_classes=10)


def test_missing_timm_is_reported_by_the_cli(tmp_path, monkeypatch, capsys):
    from kdlab.cli import main

    monkeypatch.setitem(sys.modules, "timm", None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nmodel: {{name: 'timm:resnet18'}}\n"
                   "train: {epochs: 1, device: cpu, progress: false, tensorboard: false}\n"
                   "data: {name: digits, num_workers: 0, train_subset: 32}\n")
    assert main(["train", str(cfg)]) == 2
    assert "pip install 'kdlab[timm]'" in capsys.readouterr().err


# ------------------------------------------------------------------ the custom-module adapter
def test_adapter_clones_features_so_inplace_ops_cannot_corrupt_them():
    from custom_nets import SmallNet
    from kdlab.models.adapter import wrap_model

    torch.manual_seed(0)
    net = SmallNet(10).eval()
    model = wrap_model(net, stages=["block1", "block2"], preact=["block1.act", "block2.act"], classifier="fc")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, feats = model(x, features=True)
        b = net.block1
        s = net.stem(x)
        true_pre = b.conv2(F.relu(b.conv1(s))) + b.skip(s)
    torch.testing.assert_close(logits, model(x))
    assert (feats.preact_stages[0] < 0).any()
    torch.testing.assert_close(feats.preact_stages[0], true_pre)
    torch.testing.assert_close(feats.stages[0], F.relu(true_pre))
    assert feats.pooled.shape == (2, 16)
    assert [i.channels for i in feature_info(model, (3, 16, 16)).stages] == [8, 16]
    with pytest.raises(ConfigError, match=r"no submodule 'blok1'; did you mean 'block1'"):
        wrap_model(net, stages=["blok1"])


def test_py_prefix_builds_custom_models_and_refuses_unwrapped_ones(tmp_path):
    model = create_model(f"py:{CUSTOM}:small_net", num_classes=4, width=4)
    assert isinstance(model, FeatureClassifier) and model(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    again = create_model(f"py:{CUSTOM}:small_net", num_classes=4, width=4, weights=str(tmp_path / "w.pt"))
    assert torch.equal(again.net.fc.weight, model.net.fc.weight)
    with pytest.raises(ConfigError, match="return kdlab.models.adapter.wrap_model"):
        create_model(f"py:{CUSTOM}:not_wrapped", num_classes=4)
    with pytest.raises(ConfigError, match="does not exist"):
        create_model(f"py:{tmp_path}/nope.py:f", num_classes=4)


# ------------------------------------------------------------------ cross-family distillation
def _one_step(method: str, student: nn.Module, teacher: nn.Module, side: int = 32, **extra) -> dict:
    from kdlab.methods import method_class

    cls = method_class(method)
    cfg = cls.Config.model_validate({"name": method, **extra})
    distiller = cls(student, teacher, cfg, input_size=(3, side, side), num_classes=10)
    distiller.train()
    params = list(distiller.trainable_parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.01)
    x, y = torch.randn(4, 3, side, side), torch.arange(4) % 10
    out = distiller(Batch(x, y), 5)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in distiller.teacher.parameters())
    return {k: float(v.detach()) for k, v in out.losses.items()}


@pytest.mark.parametrize("method", ["kd", "dkd", "reviewkd"])
def test_torchvision_resnet_teacher_distils_zoo_and_torchvision_students(method, tv_resnet18):
    for student in ("resnet8", "tv:mobilenet_v3_small"):
        torch.manual_seed(0)
        losses = _one_step(method, create_model(student, num_classes=10), tv_resnet18)
        if method == "reviewkd":
            assert losses["reviewkd"] > 0


@needs_timm
def test_timm_convnext_teacher_distils_a_torchvision_resnet_with_reviewkd():
    torch.manual_seed(0)
    teacher = create_model("timm:convnext_atto", num_classes=10)
    losses = _one_step("reviewkd", create_model("tv:resnet18", num_classes=10), teacher)
    assert losses["reviewkd"] > 0


@pytest.mark.slow
def test_train_command_with_torchvision_teacher_checkpoint_and_student(make_config, tmp_path):
    """End to end: a tv: teacher from a kdlab checkpoint, a tv: student, DKD, via the trainer."""
    from kdlab.config import validate_config
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    teacher = create_model("tv:resnet18", num_classes=10)
    Checkpoint.for_model(teacher, "tv:resnet18", 10).save(tmp_path / "teacher.pt")
    cfg = validate_config(make_config(
        model={"name": "tv:mobilenet_v3_small"},
        teacher={"name": "tv:resnet18", "checkpoint": str(tmp_path / "teacher.pt")},
        method={"name": "dkd", "warmup_epochs": 1},
        data={"train_subset": 64, "batch_size": 32},
    ))
    result = Trainer(cfg).fit()
    assert torch.isfinite(torch.tensor(result.history[-1]["train/loss"]))
    # the student checkpoint rebuilds through the same tv: prefix
    from kdlab.engine.checkpoint import build_model_from_checkpoint

    student, _ = build_model_from_checkpoint(Path(result.run_dir) / "last.pt")
    assert type(student).__name__ == "TorchvisionClassifier"
