"""DDP through torchrun: 2 CPU processes (gloo) against one process with the same global batch.

Why the comparison can be tight: `data.batch_size` is the global batch (each of the 2 ranks
loads half of every step, the same samples the single process loads in that step, with the
same per-sample augmentation), DDP averages the gradients of the two halves, and the model
(tests/custom_nets.py: SmallNet) has no batch norm. With batch norm each rank would
normalise with its own half-batch (SyncBatchNorm, `train.sync_bn`, needs CUDA), which changes
the result by more than float noise; that policy is checked separately below.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.engine.distributed import DistInfo, ShardSampler, convert_sync_bn, per_rank_batch
from kdlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CUSTOM = Path(__file__).with_name("custom_nets.py")


def _write_setup(tmp_path: Path) -> Path:
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.models import create_model

    torch.manual_seed(123)
    teacher = create_model(f"py:{CUSTOM}:small_net", num_classes=10, width=16)
    Checkpoint.for_model(teacher, f"py:{CUSTOM}:small_net", 10, {"width": 16}).save(tmp_path / "teacher.pt")
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path / 'runs'}
model: {{name: "py:{CUSTOM}:small_net"}}
teacher: {{name: "py:{CUSTOM}:small_net", checkpoint: {tmp_path / 'teacher.pt'}, kwargs: {{width: 16}}}}
method: {{name: kd, temperature: 4.0, ce_weight: 0.5, kd_weight: 0.5}}
data: {{name: digits, batch_size: 32, num_workers: 0, train_subset: 128}}
optim: {{lr: 0.2}}
schedule: {{name: constant}}
train: {{epochs: 2, seed: 3, device: cpu, progress: false, tensorboard: true, save_every: 1}}
""")
    return cfg


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    cfg_path = _write_setup(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kdlab", "train", str(cfg_path), "name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("last top1") == 1, "only rank 0 reports"

    from kdlab.config import load_config
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.trainer import Trainer

    Trainer(load_config(cfg_path, ["name=single", "train.tensorboard=false"])).fit()

    ddp_dir, one_dir = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"
    # only rank 0 wrote: one line per epoch (appends from two ranks would double them), one event file
    lines = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert len(list((ddp_dir / "tb").glob("events.out.tfevents.*"))) == 1

    ddp = Checkpoint.load(ddp_dir / "last.pt").model_state
    one = Checkpoint.load(one_dir / "last.pt").model_state
    epoch1 = Checkpoint.load(one_dir / "epoch_1.pt").model_state
    gap = max((ddp[k] - one[k]).abs().max().item() for k in one)
    step = max((one[k] - epoch1[k]).abs().max().item() for k in one)
    assert gap < 1e-4, f"2-process weights differ from 1-process weights by {gap}"
    assert step > 100 * gap, "the comparison is not vacuous: epoch 2 alone moved the weights far more"
    ddp_hist = Checkpoint.load(ddp_dir / "last.pt").history
    one_hist = Checkpoint.load(one_dir / "last.pt").history
    for a, b in zip(ddp_hist, one_hist, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["train/kd"] == pytest.approx(b["train/kd"], rel=1e-4)
        assert a["train/top1"] == pytest.approx(b["train/top1"], abs=1e-6)
        # sharded evaluation summed over the ranks = the whole set evaluated in one process
        assert a["val/top1"] == pytest.approx(b["val/top1"], abs=0.3)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)


def test_global_batch_is_split_over_ranks():
    assert per_rank_batch(512, DistInfo(8, 3, 3)) == 64
    assert per_rank_batch(64, DistInfo()) == 64
    with pytest.raises(ConfigError, match=r"data.batch_size=100 is the global batch and must be divisible by .*3"):
        per_rank_batch(100, DistInfo(3, 0, 0))


def test_evaluation_shards_cover_every_sample_once():
    for n, world in [(10, 3), (7, 2), (2, 4)]:
        shards = [list(ShardSampler(n, DistInfo(world, r, r))) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert sum(len(ShardSampler(n, DistInfo(world, r, r))) for r in range(world)) == n


def test_sync_bn_policy():
    from kdlab.methods.base import Distiller

    class Tiny(Distiller):
        requires_teacher = True

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    from kdlab.schema.experiment import MethodConfig

    d = Tiny(net(), net(), MethodConfig(name="x"))
    assert convert_sync_bn(d, DistInfo(), "cpu") is d  # one process: nothing to synchronise
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        convert_sync_bn(d, DistInfo(2, 0, 0), "cpu")
    convert_sync_bn(d, DistInfo(2, 0, 0), "cuda")  # conversion itself needs no process group
    assert isinstance(d.student[1], torch.nn.SyncBatchNorm)
    assert type(d.teacher[1]) is torch.nn.BatchNorm2d  # the frozen teacher keeps its BN
