"""Mixed precision, channels-last and torch.compile: each config switch runs a real training
step on CPU, and on CUDA where present (the `device` fixture), and keeps the loss finite."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from kdlab.methods.base import Batch
from kdlab.config import validate_config
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.evaluate import autocast_context
from kdlab.engine.trainer import Trainer
from kdlab.models import create_model

CUSTOM = Path(__file__).with_name("custom_nets.py")
SMALL = f"py:{CUSTOM}:small_net"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "small.pt"
    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=10, width=4)
    Checkpoint.for_model(model, SMALL, 10, {"width": 4}).save(path)
    return str(path)


def _fit(make_config, teacher_ckpt, **train):
    # the smallest KD pair (tiny convnets, digits): the switches are under test, not the models
    cfg = validate_config(make_config(
        model={"name": SMALL, "kwargs": {"width": 4}},
        teacher={"name": SMALL, "checkpoint": teacher_ckpt, "kwargs": {"width": 4}},
        method={"name": "kd"},
        data={"train_subset": 64, "batch_size": 32},
        train=train,
    ))
    trainer = Trainer(cfg)
    result = trainer.fit()
    row = result.history[-1]
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["val/loss"])
    assert result.skipped_batches == 0
    return trainer, row


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_step_in_low_precision(amp, dtype, teacher_ckpt, make_config, device):
    from kdlab.methods import method_class

    cls = method_class("kd")
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    distiller = cls(student, teacher, cls.Config(), input_size=(3, 16, 16), num_classes=10).train().to(device)
    x, y = torch.randn(8, 3, 16, 16, device=device), torch.arange(8, device=device) % 10
    with autocast_context(torch.device(device), amp):
        out = distiller(Batch(x, y), 1)
    assert out.logits.dtype == dtype  # autocast really engaged
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses.values())  # losses in fp32

    trainer, _ = _fit(make_config, teacher_ckpt, amp=amp, device=device)
    # fp16 needs loss scaling (gradients underflow otherwise), bf16 has fp32's range
    assert trainer.scaler.is_enabled() == (amp == "fp16")


def test_channels_last_trains_and_keeps_the_layout(teacher_ckpt, make_config, device):
    trainer, _ = _fit(make_config, teacher_ckpt, channels_last=True, device=device)
    convs = [m.weight for m in trainer.distiller.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:
        return shutil.which("g++") or shutil.which("c++")


@pytest.mark.slow
def test_compile_runs_one_step(make_config, device):
    """torch.compile with inductor on CPU needs a C++ compiler and takes 10-40 s to build even
    a tiny graph, so this is one step of the smallest model (a cold inductor cache is slow;
    later runs reuse /tmp/torchinductor_<user>)."""
    if device == "cpu" and _cpp_compiler() is None:
        pytest.skip("torch.compile (inductor) needs a C++ compiler on CPU; none was found (install g++)")
    cfg = validate_config(make_config(
        model={"name": SMALL, "kwargs": {"width": 4}},
        data={"train_subset": 32, "batch_size": 32},
        train={"compile": True, "device": device},
    ))
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert math.isfinite(result.history[-1]["train/loss"])
    assert trainer.step.module is not trainer.distiller  # the compiled wrapper did the step
    assert type(trainer.step.module).__name__ == "OptimizedModule"
