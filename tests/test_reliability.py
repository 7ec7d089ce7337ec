"""Bad input, numerical faults and interruptions: each fails clearly and loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from kdlab.cli import main as cli_main
from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint, atomic_save, build_model_from_checkpoint
from kdlab.engine.trainer import Trainer
from kdlab.errors import CheckpointError, KDLabError, TrainingError
from kdlab.methods import METHODS
from kdlab.methods.vanilla import Vanilla, VanillaConfig

ROOT = Path(__file__).resolve().parents[1]


class _NaNConfig(VanillaConfig):
    name: Literal["test_nan_after_2"] = "test_nan_after_2"  # type: ignore[assignment]


class _NaNAfterTwoBatches(Vanilla):
    """A method whose loss turns NaN from the third batch on (fault injection)."""

    Config = _NaNConfig
    calls = 0

    def forward_train(self, batch, epoch):
        out = super().forward_train(batch, epoch)
        type(self).calls += 1
        if type(self).calls > 2:
            out.losses["ce"] = out.losses["ce"] * float("nan")
        return out


@pytest.fixture
def nan_method():
    """`test_nan_after_2` is a method only while a test that asks for it runs."""
    _NaNAfterTwoBatches.calls = 0
    with METHODS.registered("test_nan_after_2", _NaNAfterTwoBatches):
        yield _NaNAfterTwoBatches
    assert "test_nan_after_2" not in METHODS


def _nan_config(make_config, **train):
    raw = make_config(method={"name": "test_nan_after_2"}, train={"epochs": 2, **train})
    raw["method"] = {"name": "test_nan_after_2"}
    return raw


def test_nan_loss_stops_with_step_terms_and_checkpoint(make_config, nan_method):
    cfg = load_config(data=_nan_config(make_config))
    with pytest.raises(TrainingError) as info:
        Trainer(cfg).fit()
    msg = str(info.value)
    assert "non-finite loss at epoch 1, batch 2" in msg and "ce=nan" in msg
    assert "Last good checkpoint" in msg and "train.nonfinite=skip" in msg


def test_nan_batches_can_be_skipped_and_are_counted(make_config, nan_method):
    cfg = load_config(data=_nan_config(make_config, nonfinite="skip", max_skipped=100))
    result = Trainer(cfg).fit()
    assert result.skipped_batches > 0
    weights = Checkpoint.load(Path(result.run_dir) / "last.pt").model_state
    assert all(torch.isfinite(v.float()).all() for v in weights.values())  # never trained on NaN


def test_too_many_skipped_batches_stop_the_run(make_config, nan_method):
    cfg = load_config(data=_nan_config(make_config, nonfinite="skip", max_skipped=1))
    with pytest.raises(TrainingError, match="max_skipped=1"):
        Trainer(cfg).fit()


def test_unwritable_output_folder_fails_before_training(make_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = load_config(data=make_config(output_dir=str(blocker / "runs")))
    with pytest.raises(KDLabError, match="cannot be written.*output_dir="):
        Trainer(cfg).fit()


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("teacher")
    result = Trainer(load_config(data=tiny_config(tmp, name="t", train={"epochs": 1}))).fit()
    return Path(result.run_dir) / "best.pt"


def test_teacher_of_another_architecture_is_refused(teacher_ckpt):
    with pytest.raises(CheckpointError, match="holds a 'resnet8' model but the config asks for 'resnet14'"):
        build_model_from_checkpoint(teacher_ckpt, "resnet14", 10)


def test_teacher_of_another_class_count_is_refused(teacher_ckpt):
    with pytest.raises(CheckpointError, match="trained for 10 classes but the dataset has 100"):
        build_model_from_checkpoint(teacher_ckpt, "resnet8", 100)


def test_mismatching_weights_name_the_keys(teacher_ckpt, tmp_path):
    ckpt = Checkpoint.load(teacher_ckpt)
    ckpt.model.name = "resnet14"  # lie about the architecture
    bad = tmp_path / "lying.pt"
    ckpt.save(bad)
    with pytest.raises(CheckpointError, match=r"does not fit model 'resnet14': missing: .*layer"):
        build_model_from_checkpoint(bad, "resnet14", 10)


def test_corrupt_truncated_and_foreign_checkpoints(teacher_ckpt, tmp_path):
    data = teacher_ckpt.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a kdlab checkpoint"):
        Checkpoint.load(foreign)
    with pytest.raises(CheckpointError, match="does not exist.*kdlab train"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"format": "x", "v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_cli_prints_one_clear_error_and_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "resnet8"}, "trian": {"epochs": 1}}))
    assert cli_main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'trian'; did you mean 'train'?" in err and "Traceback" not in err


def _run_cli(args, cwd, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "kdlab", "-q", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow  # a real training process, signalled (make test-fast leaves it out)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """A real training process killed with SIGKILL mid-run resumes to the same weights."""
    from tests.conftest import tiny_config

    raw = tiny_config(tmp_path, data={"batch_size": 16, "train_subset": 384},
                      train={"epochs": 3, "deterministic": True}, schedule={"name": "cosine"})
    for name in ("ref", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "name": name}))
    ref = _run_cli([str(tmp_path / "ref.yaml")], tmp_path)
    victim = _run_cli([str(tmp_path / "killed.yaml")], tmp_path)
    last = tmp_path / "runs" / "killed" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # now inside epoch 2 (or later): kill without any chance to clean up
    victim.send_signal(signal.SIGKILL)
    # The kill must land mid-run, or the resume below would test nothing.
    assert victim.wait() == -signal.SIGKILL, "the run finished before it was killed"
    killed = Checkpoint.load(last)
    assert 1 <= killed.epoch < 3 and killed.partial is None, (killed.epoch, killed.partial)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    resumed = _run_cli([str(tmp_path / "killed.yaml"), "--resume"], tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = Checkpoint.load(tmp_path / "runs" / "ref" / "last.pt")
    b = Checkpoint.load(tmp_path / "runs" / "killed" / "last.pt")
    assert b.epoch == 3
    for k, v in a.model_state.items():
        assert torch.equal(v, b.model_state[k]), k
    assert a.best == b.best
    rows = (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # epochs logged once each, even though one ran twice


@pytest.mark.slow  # a real training process, signalled (make test-fast leaves it out)
def test_sigint_saves_and_exits_cleanly(tmp_path):
    from tests.conftest import tiny_config

    batch_size, samples = 8, 1024
    raw = tiny_config(tmp_path, name="int", data={"batch_size": batch_size, "train_subset": samples},
                      train={"epochs": 50})
    (tmp_path / "int.yaml").write_text(yaml.safe_dump(raw))
    proc = _run_cli([str(tmp_path / "int.yaml")], tmp_path)
    last = tmp_path / "runs" / "int" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    epoch_end = Checkpoint.load(last)  # the end-of-epoch save the Ctrl-C save must replace
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "interrupted" in proc.stderr.read().decode()
    ckpt = Checkpoint.load(last)
    # A mid-epoch save of the epoch after `epoch_end`: how many batches ran, their running sums,
    # and the weights those batches trained (not the epoch-end weights again).
    assert ckpt.epoch == epoch_end.epoch and epoch_end.partial is None
    assert ckpt.partial is not None, "Ctrl-C saved no mid-epoch position"
    assert 1 <= ckpt.partial["batches"] <= samples // batch_size, ckpt.partial["batches"]
    assert ckpt.partial["sums"]["count"] == batch_size * ckpt.partial["batches"]
    assert any(not torch.equal(v, epoch_end.model_state[k]) for k, v in ckpt.model_state.items())
