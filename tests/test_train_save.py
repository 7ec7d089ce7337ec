"""`train.save`: which checkpoints a run keeps (last.pt with the optimizer state for exact
resume and best.pt with the weights only by default; best.pt alone; none), and what refuses
to resume from a run that kept no last.pt."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint, build_model_from_checkpoint
from kdlab.engine.trainer import Trainer
from kdlab.errors import ConfigError, KDLabError
from kdlab.generations.config import load_chain


class _Run:
    def __init__(self, result):
        self.run_dir = Path(result.run_dir)


def _fit(raw, **kwargs):
    return _Run(Trainer(load_config(data=raw), **kwargs).fit())


def _checkpoints(run_dir):
    return sorted(p.name for p in run_dir.glob("*.pt"))


def test_default_keeps_a_resumable_last_and_a_weights_only_best(make_config):
    run = _fit(make_config(train={"save_every": 1}))
    assert _checkpoints(run.run_dir) == ["best.pt", "epoch_1.pt", "last.pt"]
    last, best = Checkpoint.load(run.run_dir / "last.pt"), Checkpoint.load(run.run_dir / "best.pt")
    assert last.optimizer and last.scheduler and last.rng
    assert Checkpoint.load(run.run_dir / "epoch_1.pt").optimizer  # epoch_N.pt resumes like last.pt
    assert best.optimizer is best.scheduler is best.rng is best.scaler is None
    assert best.extra_state == {} and best.callbacks == {}
    # Everything that identifies and evaluates the model is kept.
    assert best.epoch == 1 and best.best == last.best and best.config == last.config
    assert best.class_names == last.class_names and best.model == last.model
    for key, value in last.model_state.items():  # one epoch: the best epoch is the last one
        assert torch.equal(best.model_state[key], value), key
    assert (run.run_dir / "best.pt").stat().st_size < 0.75 * (run.run_dir / "last.pt").stat().st_size
    model, _ = build_model_from_checkpoint(run.run_dir / "best.pt", "resnet8", 10)  # what eval and teachers load
    assert all(torch.equal(v, best.model_state[k]) for k, v in model.state_dict().items())


def test_default_resume_is_exact(make_config, monkeypatch):
    from kdlab.methods.vanilla import Vanilla

    def raw(name):
        return make_config(name=name, data={"batch_size": 32}, train={"epochs": 2, "deterministic": True})

    whole = _fit(raw("whole"))
    original, calls = Vanilla.forward_train, {"n": 0}

    def interrupted(self, batch, epoch):  # Ctrl-C at the third batch of epoch 2
        calls["n"] += epoch == 2
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch, epoch)

    monkeypatch.setattr(Vanilla, "forward_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(raw("split"))
    monkeypatch.setattr(Vanilla, "forward_train", original)
    resumed = _fit(raw("split"), resume=True)
    a = Checkpoint.load(whole.run_dir / "last.pt").model_state
    b = Checkpoint.load(resumed.run_dir / "last.pt").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_best_keeps_only_the_weights_of_the_best_epoch(make_config):
    run = _fit(make_config(train={"save": "best", "save_every": 1}))
    assert _checkpoints(run.run_dir) == ["best.pt", "epoch_1.pt"]
    assert Checkpoint.load(run.run_dir / "epoch_1.pt").optimizer is None
    assert Checkpoint.load(run.run_dir / "best.pt").optimizer is None
    assert (run.run_dir / "result.json").is_file()
    # Nothing to continue from: refused before anything is written over.
    with pytest.raises(KDLabError, match=r"no last\.pt to continue from.*train\.save=best.*--overwrite"):
        Trainer(load_config(data=make_config(train={"save": "best"})), resume=True).fit()
    with pytest.raises(KDLabError, match=r"weights only.*train\.save=last.*model\.checkpoint="):
        Trainer(load_config(data=make_config(name="other")), resume=str(run.run_dir / "best.pt")).fit()


def test_save_none_writes_no_checkpoint(make_config):
    run = _fit(make_config(train={"save": "none"}))
    assert _checkpoints(run.run_dir) == []
    assert (run.run_dir / "result.json").is_file() and (run.run_dir / "metrics.jsonl").is_file()
    with pytest.raises(ConfigError, match=r"train\.save_every=2 .* train\.save=none"):
        load_config(data=make_config(train={"save": "none", "save_every": 2}))
    with pytest.raises(ConfigError, match="train.save"):
        load_config(data=make_config(train={"save": "everything"}))


def test_interrupt_without_a_resumable_checkpoint_saves_nothing_and_says_so(make_config, monkeypatch, caplog):
    from kdlab.methods.vanilla import Vanilla

    def interrupted(self, batch, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Vanilla, "forward_train", interrupted)
    trainer = Trainer(load_config(data=make_config(train={"save": "best"})))
    with caplog.at_level("WARNING", logger="kdlab"), pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert _checkpoints(Path(trainer.run_dir)) == []
    assert "train.save=best keeps no resumable checkpoint" in caplog.text


def test_a_chain_needs_the_checkpoint_it_teaches_with(tmp_path, make_config):
    def chain(save, checkpoint):
        exp = make_config(name="chain", train={"save": save})
        return {"experiment": exp, "chain": {"notation": "D(0.6, 0.6)", "generations": 1, "checkpoint": checkpoint}}

    load_chain(data=chain("best", "best"))
    load_chain(data=chain("last", "last"))
    with pytest.raises(ConfigError, match=r"last\.pt .*train\.save=best does not keep.* or chain\.checkpoint=best"):
        load_chain(data=chain("best", "last"))
    with pytest.raises(ConfigError, match=r"best\.pt .*train\.save=none does not keep"):
        load_chain(data=chain("none", "best"))
