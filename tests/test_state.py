"""The run's declared state (issue 20): callbacks get a `RunContext`, not the trainer; the run
folder writes every run file and is claimed once; sample indices reach only the methods that
ask; `Trainer.fit()` from Python shows its epoch lines, the CLI shows them once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kdlab.config import load_config
from kdlab.engine.callbacks import Callback
from kdlab.engine.launch import train_run
from kdlab.engine.run_folder import RunFolder
from kdlab.engine.state import RunContext, TrainState
from kdlab.engine.trainer import Trainer
from kdlab.errors import CheckpointError
from kdlab.methods.vanilla import Vanilla


class _Seen(Callback):
    """Records what each hook was given, and the indices of every batch the method trained on."""

    def __init__(self) -> None:
        self.runs: list[object] = []
        self.indices: list[object] = []
        self.batch = None

    def on_fit_start(self, run) -> None:
        self.runs.append(run)

    def on_batch(self, run, batch, epoch) -> None:
        self.batch = batch

    def on_step_end(self, run, batch_number, result) -> None:
        self.runs.append(run)
        self.indices.append(self.batch.indices)

    def on_epoch_end(self, run, epoch, row) -> None:
        assert run.state.history[-1] is row and run.state.epoch == epoch and run.state.step == 4 * epoch
        self.runs.append(run)


def test_callbacks_receive_the_declared_state_and_the_folder(make_config):
    seen = _Seen()
    trainer = Trainer(load_config(data=make_config(name="ctx", train={"epochs": 2})), callbacks=[seen])
    trainer.fit()
    run = seen.runs[0]
    assert all(r is run for r in seen.runs) and isinstance(run, RunContext) and not isinstance(run, Trainer)
    assert isinstance(run.state, TrainState) and run.state is trainer.state
    assert run.folder.path == trainer.run_dir and (run.epochs, run.steps_per_epoch, run.start_epoch) == (2, 4, 1)
    assert run.state.epoch == 2 and run.state.best_epoch in (1, 2) and len(run.state.history) == 2
    assert run.snapshot(2, None).train.history == run.state.history


@pytest.mark.parametrize("asks", [False, True])
def test_sample_indices_reach_only_a_method_that_asks(make_config, monkeypatch, asks):
    monkeypatch.setattr(Vanilla, "needs_sample_indices", asks)
    seen = _Seen()
    Trainer(load_config(data=make_config(name=f"idx{asks}")), callbacks=[seen]).fit()
    assert len(seen.indices) == 4
    if asks:
        got = sorted(int(i) for batch in seen.indices for i in batch)
        assert got == list(range(256))  # every training sample once (data.train_subset=256)
    else:
        assert all(i is None for i in seen.indices)


def test_the_folder_is_claimed_once_and_writes_every_run_file(make_config, monkeypatch):
    claims: list[Path] = []
    original = RunFolder.claim

    def counting(self, **kwargs):
        claims.append(self.path)
        return original(self, **kwargs)

    monkeypatch.setattr(RunFolder, "claim", counting)
    cfg = load_config(data=make_config(name="once", train={"epochs": 2, "save_every": 1}))
    result, trainer = train_run(cfg)
    folder = RunFolder(result.run_dir)
    assert trainer.is_main and claims == [folder.path] and not folder.lock_path.exists()
    assert sorted(p.name for p in folder.checkpoints()) == ["best.pt", "epoch_1.pt", "epoch_2.pt", "last.pt"]
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2] and folder.read_result()["epochs"] == 2
    assert yaml.safe_load(folder.config_path.read_text())["name"] == "once"
    folder.reset_metrics(folder.read_metrics()[:1])
    folder.append_metrics({"epoch": 9})
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 9]
    assert folder.checkpoint(3) == folder.path / "epoch_3.pt" and folder.tb_dir == folder.path / "tb"


def test_a_failed_start_leaves_no_folder_and_no_lock(make_config, tmp_path):
    cfg = load_config(data=make_config(name="broken", model={"name": "resnet8",
                                                             "checkpoint": str(tmp_path / "missing.pt")}))
    with pytest.raises(CheckpointError, match="missing.pt"):
        train_run(cfg)
    assert not (tmp_path / "runs" / "broken").exists()


_SCRIPT = """
import json, sys
from kdlab.config import load_config
from kdlab.engine.trainer import Trainer
Trainer(load_config(data=json.loads(sys.argv[1]))).fit()
"""


def test_epoch_lines_show_from_python_and_once_under_the_cli(make_config, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    raw = make_config(name="py", train={"epochs": 2})
    python = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(raw)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert python.returncode == 0, python.stderr
    assert [line.split()[1] for line in python.stderr.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump(make_config(name="cli", train={"epochs": 2})))
    cli = subprocess.run([sys.executable, "-m", "kdlab.cli", "train", str(config)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert [line.split()[1] for line in cli.stderr.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]


def test_train_metrics_are_the_literal_weighted_means_without_skipped_batches():
    import torch

    from kdlab.engine.callbacks import TrainMetrics
    from kdlab.engine.distributed import DistInfo
    from kdlab.engine.step import StepResult
    from kdlab.methods.base import Batch, StepOutput

    run = SimpleNamespace(state=TrainState(), is_main=True, device=torch.device("cpu"), dist=DistInfo())
    metrics = TrainMetrics()
    metrics.on_epoch_start(run, 1, 0)
    steps = [  # (batch size, loss, kd term, finite, logits, targets)
        (4, 2.0, 0.5, True, torch.eye(4), torch.tensor([0, 1, 0, 0])),   # 2 of 4 right
        (2, 8.0, 1.5, True, torch.eye(2), torch.tensor([0, 1])),         # 2 of 2 right
        (3, float("nan"), 9.0, False, torch.eye(3), torch.tensor([0, 1, 2])),  # skipped: not counted
    ]
    for n, loss, kd, finite, logits, targets in steps:
        batch = Batch(torch.zeros(n, 1, 2, 2), targets)
        metrics.on_batch(run, batch, 1)
        out = StepOutput(logits, {"kd": torch.tensor(kd)}, {"conf": torch.tensor(kd / 10)})
        metrics.on_step_end(run, 1, StepResult(torch.tensor(loss), torch.tensor(finite), out))
    assert metrics.position_sums() == {"train/loss": 24.0, "train/kd": 5.0, "stat/conf": pytest.approx(0.5),
                                       "correct": 4.0, "count": 6.0}
    row = metrics.epoch_row(run)
    assert row == {"train/loss": pytest.approx(24 / 6), "train/kd": pytest.approx(5 / 6),
                   "stat/conf": pytest.approx(0.5 / 6), "train/top1": pytest.approx(400 / 6)}
    # A resumed epoch starts from the sums saved with its position (rank 0's alone).
    run.state.partial = {"batches": 2, "sums": metrics.position_sums()}
    resumed = TrainMetrics()
    resumed.on_epoch_start(run, 1, 2)
    assert resumed.epoch_row(run) == row


def test_every_seed_folder_is_claimed_once(make_config, monkeypatch):
    from kdlab.experiments.seeds import run_seeds

    claims: list[Path] = []
    original = RunFolder.claim

    def counting(self, **kwargs):
        claims.append(self.path.name)
        return original(self, **kwargs)

    monkeypatch.setattr(RunFolder, "claim", counting)
    results = run_seeds(load_config(data=make_config(name="s")), 2)
    assert claims == ["s_seed0", "s_seed1"] and all(RunFolder(r.run_dir).is_finished() for r in results)
