"""Trainer behaviour: learning, logging, checkpoints, exact resume, schedules."""
from __future__ import annotations

import json

import pytest
import torch

from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.optim import lr_factor
from kdlab.engine.trainer import Trainer
from kdlab.schema.experiment import ScheduleConfig


def _fit(raw, **kwargs):
    return Trainer(load_config(data=raw), **kwargs).fit()


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_logs_every_term(make_config, tmp_path):
    raw = make_config(train={"epochs": 3}, optim={"lr": 0.1})
    result = _fit(raw)
    rows = _metrics(tmp_path / "runs" / "tiny")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train/ce"] < rows[0]["train/ce"]
    # Last = the final epoch's validation top-1; best = the first epoch with the highest one.
    val = [r["val/top1"] for r in rows]
    assert result.last["top1"] == pytest.approx(val[-1])
    assert result.best["top1"] == pytest.approx(max(val))
    assert result.best_epoch == val.index(max(val)) + 1
    assert result.best["top1"] > 10.0  # better than chance on 10 classes
    for key in ("lr", "train/loss", "train/top1", "val/top1", "val/top5", "val/loss", "best_top1"):
        assert key in rows[0]
    saved = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert saved["best"]["top1"] == pytest.approx(result.best["top1"]) and saved["headline"] == ["top1", "top5"]
    assert "last_top1" not in saved  # the metrics are the task's dicts, nothing flattened beside them
    assert (tmp_path / "runs" / "tiny" / "config.yaml").is_file()


def test_kd_run_logs_terms_and_never_touches_the_teacher(make_config, tmp_path):
    teacher_run = _fit(make_config(name="teacher"))
    ckpt = f"{teacher_run.run_dir}/best.pt"
    before = Checkpoint.load(ckpt).model_state
    raw = make_config(name="student", method={"name": "kd"}, teacher={"name": "resnet8", "checkpoint": ckpt})
    trainer = Trainer(load_config(data=raw))
    trainer.fit()
    rows = _metrics(tmp_path / "runs" / "student")
    assert {"train/ce", "train/kd", "stat/teacher_conf"} <= set(rows[0])
    teacher = trainer.distiller.teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # BN running stats unchanged too
        assert torch.equal(v.cpu(), before[k]), k
    saved = Checkpoint.load(tmp_path / "runs" / "student" / "last.pt")
    assert not any(k.startswith("teacher") for k in saved.model_state)
    assert saved.extra_state == {}
    assert saved.optimizer and saved.scheduler and saved.rng and saved.config and "top1" in saved.best


def test_ctrl_c_mid_epoch_saves_and_resume_equals_uninterrupted(make_config, tmp_path, monkeypatch):
    """Ctrl-C lands inside a step, after the forward pass updated batch norm's running statistics
    and before the optimizer step: the step completes, the save records it, and the resumed run
    equals the uninterrupted one in weights, statistics and metrics."""
    import signal

    from kdlab.methods.vanilla import Vanilla

    def raw(name):
        return make_config(name=name, data={"batch_size": 32}, schedule={"name": "cosine"},
                           train={"epochs": 2, "deterministic": True})

    ref = _fit(raw("ref"))
    original = Vanilla.forward_train
    calls = {"n": 0}

    def interrupted(self, batch, epoch):
        out = original(self, batch, epoch)
        if epoch == 2:
            calls["n"] += 1
            if calls["n"] == 3:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, mid-step
        return out

    monkeypatch.setattr(Vanilla, "forward_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(raw("cut"))
    monkeypatch.setattr(Vanilla, "forward_train", original)
    saved = Checkpoint.load(tmp_path / "runs" / "cut" / "last.pt")
    assert saved.epoch == 1 and saved.partial["batches"] == 3
    resumed = _fit(raw("cut"), resume=True)
    a = Checkpoint.load(f"{ref.run_dir}/last.pt").model_state
    b = Checkpoint.load(f"{resumed.run_dir}/last.pt").model_state
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.last["top1"] == pytest.approx(ref.last["top1"])
    ref_rows, cut_rows = _metrics(tmp_path / "runs" / "ref"), _metrics(tmp_path / "runs" / "cut")
    assert [r["epoch"] for r in cut_rows] == [1, 2]  # no epoch logged twice
    assert cut_rows[1]["train/loss"] == pytest.approx(ref_rows[1]["train/loss"])


def test_finished_run_resumes_to_the_same_result(make_config):
    raw = make_config(train={"epochs": 2})
    first = _fit(raw)
    again = _fit(raw, resume=True)
    assert again.best == first.best and again.last == first.last


def test_checkpoint_retention_is_bounded(make_config, tmp_path):
    _fit(make_config(train={"epochs": 4, "save_every": 2}))
    names = sorted(p.name for p in (tmp_path / "runs" / "tiny").glob("*.pt"))
    assert names == ["best.pt", "epoch_2.pt", "epoch_4.pt", "last.pt"]
    assert not list((tmp_path / "runs" / "tiny").glob("*.tmp"))


def test_lr_schedules():
    ms = ScheduleConfig(name="multistep", milestones=[150, 180, 210], gamma=0.1)
    # Reference semantics: with 1-based epochs, lr decays once epoch > milestone.
    assert lr_factor(149, 240, ms, 0.05) == 1.0  # epoch 150
    assert lr_factor(150, 240, ms, 0.05) == pytest.approx(0.1)  # epoch 151
    assert lr_factor(239, 240, ms, 0.05) == pytest.approx(1e-3)
    warm = ScheduleConfig(name="multistep", milestones=[30], warmup_epochs=5)
    assert [lr_factor(e, 100, warm, 0.1) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    cos = ScheduleConfig(name="cosine", min_lr=0.0)
    assert lr_factor(0, 10, cos, 0.1) == 1.0 and lr_factor(5, 10, cos, 0.1) == pytest.approx(0.5)


def test_ctrl_c_during_evaluation_keeps_the_epoch_and_resumes_exactly(make_config, tmp_path, monkeypatch):
    """Ctrl-C while evaluating saves the epoch's training (not only the previous epoch), and
    --resume goes straight to that evaluation: the result equals an uninterrupted run's."""
    from kdlab.engine.tasks.classification import ClassificationTask

    def raw(name):
        return make_config(name=name, data={"batch_size": 64}, schedule={"name": "cosine"},
                           train={"epochs": 2, "deterministic": True})

    ref = _fit(raw("ref"))
    original = ClassificationTask.evaluate
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's evaluation
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClassificationTask, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(raw("cut"))
    monkeypatch.setattr(ClassificationTask, "evaluate", original)
    saved = Checkpoint.load(tmp_path / "runs" / "cut" / "last.pt")
    assert saved.epoch == 1 and saved.partial["evaluating"] and saved.partial["batches"] == 4  # 256 / 64
    resumed = _fit(raw("cut"), resume=True)
    assert [r["val/top1"] for r in resumed.history] == [r["val/top1"] for r in ref.history]
    assert resumed.history[-1]["train/loss"] == ref.history[-1]["train/loss"]
    final = Checkpoint.load(tmp_path / "runs" / "cut" / "last.pt").model_state
    for k, v in Checkpoint.load(tmp_path / "runs" / "ref" / "last.pt").model_state.items():
        assert torch.equal(v, final[k]), k
