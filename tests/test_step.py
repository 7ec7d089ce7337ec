"""The shared training step (`kdlab.engine.step.TrainStep`): a non-finite loss never reaches the
weights or the optimizer state, and the step never waits for the host to find out."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from kdlab.schema.experiment import OptimConfig
from kdlab.engine.optim import build_optimizer
from kdlab.engine.step import NonFiniteMonitor, TrainStep
from kdlab.methods.base import Batch, Distiller, StepOutput
from kdlab.methods.vanilla import Vanilla, VanillaConfig


class _Poisoned(Vanilla):
    """Vanilla whose loss is multiplied by `factor` (NaN or inf injects a bad step)."""

    factor = 1.0

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        out = super().forward_train(batch, epoch)
        out.losses["ce"] = out.losses["ce"] * self.factor
        return out


def _distiller() -> _Poisoned:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return _Poisoned(net, None, VanillaConfig())


def _batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 5, (8,), generator=g), torch.arange(8))


@contextlib.contextmanager
def _no_host_reads():
    """Fail on any tensor -> Python value conversion (each is a host synchronisation on a GPU)."""
    names = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *a, **k):
        raise AssertionError("the training step read a tensor on the host")

    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _state(d: Distiller, opt: torch.optim.Optimizer):
    return copy.deepcopy(d.student.state_dict()), copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_nonfinite_step_changes_nothing_and_reads_nothing(bad, optim):
    d = _distiller()
    step = TrainStep.for_distiller(d, OptimConfig(name=optim, lr=0.1), torch.device("cpu"))
    assert step.on_device  # fused SGD/AdamW on the CPU skip on the device
    step(_batch(), 1)  # one good step, so momentum / Adam moments exist
    weights, opt_state = _state(d, step.optimizer)
    d.factor = bad
    with _no_host_reads():
        result = step(_batch(), 1)
    assert not bool(result.finite)
    for k, v in d.student.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for i, s in step.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_state[i][k])), (i, k)
    d.factor = 1.0
    with _no_host_reads():
        good = step(_batch(), 1)
    assert bool(good.finite)
    assert any(not torch.equal(v, weights[k]) for k, v in d.student.state_dict().items())


def test_finite_step_is_the_plain_optimizer_update():
    """The fused step the trainer uses equals torch's reference (for-loop) SGD update."""
    d, ref = _distiller(), _distiller()
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = TrainStep.for_distiller(d, cfg, torch.device("cpu"))
    opt = torch.optim.SGD(ref.trainable_parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          foreach=False)
    for _ in range(3):
        step(_batch(), 1)
        loss = sum(ref(_batch(), 1).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (k, a), b in zip(d.student.state_dict().items(), ref.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_fp16_scaler_path_skips_a_nan_step_too():
    d = _distiller()
    step = TrainStep.for_distiller(d, OptimConfig(lr=0.1), torch.device("cpu"), amp="fp16")
    assert step.scaler.is_enabled()
    step(_batch(), 1)
    weights, _ = _state(d, step.optimizer)
    d.factor = float("nan")
    with _no_host_reads():
        result = step(_batch(), 1)
    assert not bool(result.finite)
    for k, v in d.student.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_monitor_counts_skips_and_keeps_the_first_bad_batch():
    d = _distiller()
    step = TrainStep.for_distiller(d, OptimConfig(lr=0.1), torch.device("cpu"))
    monitor = NonFiniteMonitor(torch.device("cpu"))
    factors = [1.0, 1.0, float("nan"), 1.0, float("inf")]
    with _no_host_reads():
        for i, f in enumerate(factors):
            d.factor = f
            monitor.record(step(_batch(), 1), i)
    count, first, terms = monitor.poll()
    assert (count, first) == (2, 2)
    assert list(terms) == ["ce"] and terms["ce"] != terms["ce"]  # NaN: the first bad step's term
    monitor.reset()
    assert monitor.poll() == (0, -1, {})


def test_unfused_optimizer_falls_back_to_a_host_check():
    d = _distiller()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, foreach=False)
    step = TrainStep(d, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    assert not step.on_device
    weights, _ = _state(d, opt)
    d.factor = float("nan")
    assert not bool(step(_batch(), 1).finite)
    for k, v in d.student.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_trainer_optimizer_is_fused_on_cpu():
    params = [nn.Parameter(torch.randn(3))]
    assert build_optimizer(params, OptimConfig()).defaults["fused"]
    assert build_optimizer(params, OptimConfig(name="adamw")).defaults["fused"]


@pytest.mark.parametrize("setting, kept", [("", True), ("system", False)])
def test_a_cpu_step_makes_the_allocator_keep_large_freed_blocks(setting, kept):
    """In a fresh process (the setting is process-wide): building a CPU TrainStep turns glibc's
    mmap-per-large-allocation off, so a freed 64 MiB tensor's memory is reused, not faulted in
    again; KDLAB_HOST_MALLOC=system opts out."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting applies to glibc only")
    code = (
        "import resource, torch\n"
        "from torch import nn\n"
        "from kdlab.schema.experiment import OptimConfig\n"
        "from kdlab.engine.step import TrainStep\n"
        "from kdlab.engine.device import keep_freed_host_memory\n"
        "TrainStep(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),\n"
        "          torch.amp.GradScaler('cpu', enabled=False), torch.device('cpu'))\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.empty(16 * 2**20).fill_(1.0)\n"  # 64 MiB, freed at once
        "before = faults()\n"
        "for _ in range(5):\n"
        "    torch.empty(16 * 2**20).fill_(1.0)\n"
        "print(keep_freed_host_memory(), faults() - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "KDLAB_HOST_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    flag, faults = out.stdout.split()
    assert flag == str(kept)
    # Each fresh 64 MiB costs 16384 minor faults (4 KiB pages): the system default pays them on
    # every one of the 5 allocations, the kept heap at most on the first.
    pages = 16 * 2**20 * 4 // 4096
    assert (int(faults) <= 1.5 * pages if kept else int(faults) >= 4 * pages), faults
