"""The commands that only read (`kdlab results`, `plot`, `reproduce --list`) start without
importing torch, and `kdlab results` still tells the same experiment from another."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kdlab.config import load_config
from kdlab.engine.trainer import Trainer
from kdlab.experiments.results import find_runs, group_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of one tiny digits config, trained for real."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("read_only")
    for seed in (0, 1):
        raw = tiny_config(tmp, name=f"tiny_seed{seed}", data={"train_subset": 64}, train={"seed": seed})
        Trainer(load_config(data=raw)).fit()
    return tmp / "runs"


def _modules_after(argv: list[str], cwd: Path) -> dict:
    """Run `kdlab ARGV` in a fresh interpreter; its exit code, output and whether torch was imported."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from kdlab.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main({argv!r})
        print(json.dumps({{"rc": rc, "out": out.getvalue(), "torch": "torch" in sys.modules,
                           "torchvision": "torchvision" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_kdlab_results_imports_no_torch(runs, tmp_path):
    for argv in (["results", str(runs)], ["results", str(runs), "--csv"]):
        got = _modules_after(argv, tmp_path)
        assert got["rc"] == 0 and "tiny" in got["out"] and "configs differ" not in got["out"], got
        assert not got["torch"] and not got["torchvision"], argv


def test_kdlab_plot_and_reproduce_list_import_no_torch(runs, tmp_path):
    got = _modules_after(["plot", str(runs), "--out", str(tmp_path / "c.png")], tmp_path)
    assert got["rc"] == 0 and (tmp_path / "c.png").is_file() and not got["torch"], got
    got = _modules_after(["reproduce", "--list"], ROOT)
    assert got["rc"] == 0 and "dkd/cifar100/resnet32x4_resnet8x4" in got["out"] and not got["torch"], got


def test_results_compares_saved_configs_as_the_schema_reads_them(runs, tmp_path):
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    # A run written before a setting existed lacks its key: the same experiment all the same.
    path = copy / "tiny_seed1" / "config.yaml"
    older = yaml.safe_load(path.read_text())
    del older["train"]["save"], older["data"]["image_size"]
    path.write_text(yaml.safe_dump(older))
    [group] = group_runs(find_runs(copy))
    assert group.n == 2 and group.consistent
    # Another learning rate is another experiment.
    older["optim"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(older))
    [group] = group_runs(find_runs(copy))
    assert not group.consistent
