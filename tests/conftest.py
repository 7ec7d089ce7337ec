"""Test-suite settings: small thread counts (the suite runs on 2 cores, often with
pytest-xdist workers), no progress bars, and a helper to build tiny experiment configs."""
from __future__ import annotations

import pytest
import torch

# One intra-op thread per test process: the suite runs as two xdist workers on two cores,
# and with two threads each the workers' OpenMP spin-waits make convolutions ~10x slower.
torch.set_num_threads(1)

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: the CUDA instance of a device-parametrised test (skipped, and counted, without "
        "CUDA; `pytest -m cuda` runs only these, as benchmarks/gpu_check does)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="CUDA is not available here")])])
def device(request) -> str:
    """The device a test trains on: 'cpu', and 'cuda' where a GPU is present. For the tests of
    the CUDA paths (AMP, channels-last, compile, the GPU pipeline, the teacher cache) that were
    written on CPU: where CUDA exists they run there too."""
    return request.param


def tiny_config(tmp_path, **sections) -> dict:
    """A raw config dict for a 1-epoch digits run in `tmp_path` (sections override)."""
    from kdlab.config import deep_merge

    base = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "resnet8"},
        "data": {"name": "digits", "batch_size": 64, "num_workers": 0, "train_subset": 256},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "device": "cpu"},
    }
    return deep_merge(base, sections)


@pytest.fixture
def make_config(tmp_path):
    def make(**sections):
        return tiny_config(tmp_path, **sections)

    return make


def forget_plugins(written) -> None:
    """Unregister the methods and forget the modules of plugin files written by a test
    ((path, method name) pairs), so that no later test in this process meets them."""
    import sys

    from kdlab.config import plugins
    from kdlab.methods import METHODS

    for path, name in written:
        if name in METHODS:
            METHODS.unregister(name)
        module = plugins._imported.pop(str(path.resolve()), None)
        if module is not None:
            sys.modules.pop(module.__name__, None)


@pytest.fixture
def method_plugin(tmp_path):
    """`write(template)`: a plugin file registering a method of a fresh name (`template` has a
    `{name}` field), returned as (path, name); the method and the module are forgotten after the
    test, so that no later test in this process meets it in the registry (a test that sets up
    every registered method would run it)."""
    import uuid

    written: list[tuple[object, str]] = []

    def write(template: str):
        name = f"plugin_{uuid.uuid4().hex[:8]}"
        path = tmp_path / f"{name}.py"
        path.write_text(template.format(name=name))
        written.append((path, name))
        return path, name

    yield write
    forget_plugins(written)
