"""The versioned checkpoint type: round trip, files of versions 1 and 2 in exactly the layouts
those kdlabs wrote, the self-saving components of version 3 (issue 20), version checks, and
corrupt or foreign files refused without PyTorch's unsafe advice (issue 14)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from kdlab.cli import main
from kdlab.config import config_to_dict, load_config
from kdlab.engine.build import build_distiller
from kdlab.engine.callbacks import Callback
from kdlab.engine.checkpoint import (
    CURRENT_VERSION,
    FORMAT,
    Checkpoint,
    ModelRecord,
    build_model_from_checkpoint,
)
from kdlab.engine.optim import build_optimizer, build_scheduler
from kdlab.engine.seed import rng_state
from kdlab.errors import CheckpointError
from kdlab.models import create_model
from kdlab.models.weights import read_state_dict

#: The keys `Trainer._checkpoint` wrote in format version 1 (kdlab up to commit 5a1aaa8).
V1_KEYS = ("format", "version", "model", "model_state", "extra_state", "method", "optimizer", "scheduler",
           "scaler", "epoch", "best_top1", "best_top5", "best_epoch", "skipped_batches", "history", "rng",
           "partial", "config", "class_names")
V1_HISTORY = [{"epoch": 1, "lr": 0.05, "train/loss": 1.91, "train/ce": 1.91, "train/top1": 35.2, "val/top1": 61.5,
               "val/top5": 94.5, "val/loss": 1.37, "best_top1": 61.5, "time_s": 1.2}]


def write_v1_checkpoint(path: Path, raw_cfg: dict, seed: int = 0) -> dict:
    """A checkpoint in exactly the version-1 layout the pre-`Checkpoint` trainer wrote after
    epoch 1 of a vanilla run (`Trainer._checkpoint`, saved with `torch.save` via a temp file)."""
    cfg = load_config(data=raw_cfg)
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.epochs)
    raw = {
        "format": "kdlab-checkpoint",
        "version": 1,
        "model": {"name": cfg.model.name, "num_classes": 10, "kwargs": dict(cfg.model.kwargs)},
        "model_state": model.state_dict(),
        "extra_state": {},
        "method": cfg.method.name,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,
        "epoch": 1,
        "best_top1": 61.5,
        "best_top5": 94.5,
        "best_epoch": 1,
        "skipped_batches": 0,
        "history": V1_HISTORY,
        "rng": rng_state(),
        "partial": None,
        "config": config_to_dict(cfg),
        "class_names": [str(i) for i in range(10)],
    }
    assert tuple(raw) == V1_KEYS
    torch.save(raw, path)
    return raw


@pytest.fixture
def v1(make_config, tmp_path):
    raw_cfg = make_config(name="old", train={"epochs": 2})
    path = tmp_path / "old.pt"
    return path, write_v1_checkpoint(path, raw_cfg), raw_cfg


# ----------------------------------------------------------------------------- version 1


def test_version_1_loads_into_the_new_type(v1):
    path, raw, _ = v1
    ckpt = Checkpoint.load(path)
    assert ckpt.version == 1
    assert ckpt.model == ModelRecord("resnet8", 10, {})
    assert ckpt.best == {"top1": 61.5, "top5": 94.5} and ckpt.best_top1 == 61.5 and ckpt.best_top5 == 94.5
    assert (ckpt.epoch, ckpt.best_epoch, ckpt.method, ckpt.history) == (1, 1, "vanilla", V1_HISTORY)
    assert ckpt.callbacks == {} and ckpt.partial is None and ckpt.config == raw["config"]
    assert ckpt.optimizer == raw["optimizer"] and ckpt.scheduler == raw["scheduler"]
    for k, v in raw["model_state"].items():
        assert torch.equal(ckpt.model_state[k], v), k
    # Saved again, it is a version-3 file: `best` inside the train state, no best_top1/best_top5.
    again = path.with_name("again.pt")
    ckpt.save(again)
    on_disk = torch.load(again, weights_only=True)
    assert on_disk["version"] == CURRENT_VERSION == 3
    assert on_disk["state"]["train"]["best"] == {"top1": 61.5, "top5": 94.5}
    assert "best_top1" not in on_disk and Checkpoint.load(again).best == ckpt.best


def test_version_1_mid_epoch_1_save_has_no_best_yet(make_config, tmp_path):
    raw = write_v1_checkpoint(tmp_path / "cut.pt", make_config())
    raw.update(epoch=0, best_top1=-1.0, best_top5=0.0, best_epoch=0, partial={"batches": 2, "sums": {"ce": 4.2}})
    torch.save(raw, tmp_path / "cut.pt")
    ckpt = Checkpoint.load(tmp_path / "cut.pt")
    assert ckpt.best == {} and math.isnan(ckpt.best_top1)  # -1.0 was the "not evaluated yet" sentinel
    assert ckpt.partial == {"batches": 2, "sums": {"ce": 4.2}}


def test_kdlab_eval_reads_a_version_1_checkpoint(v1, capsys):
    path, raw, _ = v1
    assert main(["eval", str(path), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epoch"] == 1 and out["model"] == "resnet8" and 0.0 <= out["top1"] <= 100.0


def test_a_version_1_checkpoint_is_a_teacher(v1, make_config):
    path, raw, _ = v1
    cfg = load_config(data=make_config(method={"name": "kd"}, teacher={"name": "resnet8", "checkpoint": str(path)}))
    teacher = build_distiller(cfg, 10, (1, 16, 16)).teacher
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, raw["model_state"][k]), k


def test_a_run_resumes_from_a_version_1_checkpoint(v1, tmp_path):
    from kdlab.engine.trainer import Trainer

    path, raw, raw_cfg = v1
    result = Trainer(load_config(data=raw_cfg), resume=str(path)).fit()
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[0] == V1_HISTORY[0]  # epoch 1 comes from the old file, epoch 2 was trained
    assert Checkpoint.load(Path(result.run_dir) / "last.pt").version == CURRENT_VERSION


def test_hand_built_version_1_files_without_version_read_as_version_1(tmp_path):
    model = create_model("resnet8", num_classes=10)
    torch.save({"format": FORMAT, "model": {"name": "resnet8", "num_classes": 10, "kwargs": {}},
                "model_state": model.state_dict()}, tmp_path / "t.pt")
    rebuilt, ckpt = build_model_from_checkpoint(tmp_path / "t.pt", "resnet8", 10)
    assert ckpt.version == 1 and ckpt.best == {} and ckpt.epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


# ----------------------------------------------------------------------------- current version


def test_round_trip_keeps_every_field(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    ckpt = Checkpoint.for_model(
        model, "resnet8", 10, method="kd", extra_state={"bank": torch.arange(3.0)},
        epoch=7, best={"top1": 70.5, "top5": 91.0}, best_epoch=6, skipped_batches=2, history=[{"epoch": 1}],
        partial={"batches": 3, "sums": {"ce": 1.5}}, callbacks={"metrics": {"rows": 7}},
        config={"name": "x"}, class_names=["a", "b"])
    ckpt.save(tmp_path / "c.pt")
    back = Checkpoint.load(tmp_path / "c.pt")
    for name in ("model", "method", "epoch", "best", "best_epoch", "skipped_batches", "history", "partial",
                 "callbacks", "config", "class_names", "version", "optimizer", "scheduler", "scaler", "rng"):
        assert getattr(back, name) == getattr(ckpt, name), name
    assert torch.equal(back.extra_state["bank"], torch.arange(3.0))
    assert all(torch.equal(back.model_state[k], v) for k, v in model.state_dict().items())
    assert Checkpoint.from_dict(ckpt.to_dict(), "memory").to_dict().keys() == ckpt.to_dict().keys()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # atomic: no temporary file left


def test_best_properties_are_nan_without_an_evaluation():
    ckpt = Checkpoint(ModelRecord("resnet8", 10, {}), {})
    assert math.isnan(ckpt.best_top1) and math.isnan(ckpt.best_top5)
    detector = Checkpoint(ModelRecord("det", 3, {}), {}, state={"train": {"best": {"bbox_ap": 0.3}}})
    assert detector.best == {"bbox_ap": 0.3}


def _saved(tmp_path, **changes) -> Path:
    d = Checkpoint.for_model(create_model("resnet8", num_classes=10), "resnet8", 10).to_dict()
    d.update(changes)
    torch.save(d, tmp_path / "x.pt")
    return tmp_path / "x.pt"


def test_a_newer_version_is_refused_naming_both_versions(tmp_path):
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(_saved(tmp_path, version=4))
    msg = str(info.value)
    assert "written by a newer kdlab (format version 4)" in msg and "reads 'kdlab-checkpoint' versions 1-3" in msg
    assert msg.endswith("upgrade kdlab")


@pytest.mark.parametrize("version", [0, "2", None])
def test_an_unknown_version_is_refused(tmp_path, version):
    with pytest.raises(CheckpointError, match=r"unknown format version .*versions 1-3"):
        Checkpoint.load(_saved(tmp_path, version=version))


def test_an_unknown_format_marker_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"format 'kdlab-checkpoint-ng', which this kdlab does not know .*"
                                              r"versions 1-3.*upgrade kdlab"):
        Checkpoint.load(_saved(tmp_path, format="kdlab-checkpoint-ng"))


def test_unknown_fields_and_missing_records_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="fields this kdlab does not know: ema_state"):
        Checkpoint.load(_saved(tmp_path, ema_state={}))
    path = _saved(tmp_path)
    d = torch.load(path, weights_only=True)
    del d["model"]
    torch.save(d, path)
    with pytest.raises(CheckpointError, match="has no 'model' record"):
        Checkpoint.load(path)


# ----------------------------------------------------------------------------- corrupt and foreign files

def _run_code(path: str) -> None:
    Path(path).write_text("unpickling ran code from the file")


class _Payload:
    """Unpickling it calls `_run_code(marker)`: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_run_code, (str(self.marker),))


def _assert_safe(msg: str) -> None:
    assert "weights_only" not in msg and "arbitrary code" not in msg and "Traceback" not in msg


def test_truncated_checkpoint(tmp_path):
    full = _saved(tmp_path).read_bytes()
    (tmp_path / "cut.pt").write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(tmp_path / "cut.pt")
    assert "is corrupt or truncated" in str(info.value) and "best.pt, last.pt" in str(info.value)
    _assert_safe(str(info.value))


def test_pickle_with_a_foreign_class_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"model_state": {}, "hook": _Payload(marker)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(tmp_path / "foreign.pt")
    msg = str(info.value)
    assert "is not a kdlab checkpoint" in msg and "_run_code" in msg and "model.weights=PATH" in msg
    _assert_safe(msg)
    # The same through the CLI: one message, exit code 2.
    assert main(["eval", str(tmp_path / "foreign.pt")]) == 2
    err = capsys.readouterr().err
    assert "is not a kdlab checkpoint" in err
    _assert_safe(err)
    # and through model.weights, which reads state dicts the same safe way
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "foreign.pt")
    assert "pickled Python objects" in str(info.value)
    _assert_safe(str(info.value))
    assert not marker.exists()


def test_plain_state_dict_points_to_model_weights(tmp_path):
    torch.save(create_model("resnet8", num_classes=10).state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CheckpointError) as info:
        build_model_from_checkpoint(tmp_path / "sd.pth", "resnet8", 10)
    msg = str(info.value)
    assert "not a kdlab checkpoint (a plain state dict" in msg and "model.weights=PATH" in msg
    _assert_safe(msg)
    assert set(read_state_dict(tmp_path / "sd.pth")) == set(create_model("resnet8", num_classes=10).state_dict())


def test_a_file_that_is_not_a_dict_is_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a kdlab checkpoint .*holds a list"):
        Checkpoint.load(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- versions 2 and 3

#: The keys `Checkpoint.to_dict` wrote in format version 2 (kdlab before issue 20), in that order.
V2_KEYS = ("format", "model", "model_state", "method", "extra_state", "optimizer", "scheduler", "scaler", "epoch",
           "best", "best_epoch", "skipped_batches", "history", "rng", "partial", "callbacks", "config",
           "class_names", "version")


def as_version_2(ckpt: Checkpoint) -> dict:
    """`ckpt` in exactly the version-2 layout: each component and each field of the run's
    position a key of its own, callbacks' state under `callbacks`."""
    raw = {"format": FORMAT, "model": asdict(ckpt.model), "model_state": ckpt.model_state, "method": ckpt.method,
           "extra_state": ckpt.extra_state, "optimizer": ckpt.optimizer, "scheduler": ckpt.scheduler,
           "scaler": ckpt.scaler, "epoch": ckpt.epoch, "best": ckpt.best, "best_epoch": ckpt.best_epoch,
           "skipped_batches": ckpt.skipped_batches, "history": ckpt.history, "rng": ckpt.rng,
           "partial": ckpt.partial, "callbacks": ckpt.callbacks, "config": ckpt.config,
           "class_names": ckpt.class_names, "version": 2}
    assert tuple(raw) == V2_KEYS
    return raw


class _StopAfterSteps(Callback):
    """Ctrl-C after `steps` optimizer steps of the run."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, run, batch_number, result) -> None:
        if run.state.step == self.steps:
            raise KeyboardInterrupt


class _StepCounter(Callback):
    """A stateful callback: counts the steps it saw, and what it was given back on resume."""

    key = "counter"

    def __init__(self) -> None:
        self.steps, self.loaded = 0, None

    def on_step_end(self, run, batch_number, result) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loaded, self.steps = dict(state), state["steps"]


def _trained(cfg_raw: dict, name: str, **kwargs) -> tuple[Path, dict]:
    from kdlab.engine.trainer import Trainer

    result = Trainer(load_config(data={**cfg_raw, "name": name}), **kwargs).fit()
    return Path(result.run_dir), Checkpoint.load(Path(result.run_dir) / "last.pt").model_state


def test_a_version_2_file_resumes_exactly_as_its_version_3_twin(make_config, tmp_path):
    from kdlab.engine.trainer import Trainer

    raw_cfg = make_config(name="cut", train={"epochs": 2})  # 4 steps per epoch
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(data=raw_cfg), callbacks=[_StopAfterSteps(3)]).fit()
    last = Path(raw_cfg["output_dir"]) / "cut" / "last.pt"
    v3 = Checkpoint.load(last)
    assert v3.version == 3 and v3.partial["batches"] == 3 and v3.train.step == 3
    torch.save(as_version_2(v3), tmp_path / "v2.pt")
    v2 = Checkpoint.load(tmp_path / "v2.pt")
    assert v2.version == 2 and set(v2.state) == set(v3.state) == {"train", "extras", "optimizer", "scheduler", "rng"}
    assert (v2.epoch, v2.partial, v2.history) == (v3.epoch, v3.partial, v3.history)
    dir3, weights3 = _trained(raw_cfg, "from_v3", resume=str(last))
    dir2, weights2 = _trained(raw_cfg, "from_v2", resume=str(tmp_path / "v2.pt"))
    assert weights2.keys() == weights3.keys() and all(torch.equal(weights2[k], weights3[k]) for k in weights3)
    rows = [[{k: v for k, v in r.items() if k != "time_s"} for r in Checkpoint.load(d / "last.pt").history]
            for d in (dir2, dir3)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[0]] == [1, 2]


def test_version_3_saves_components_it_does_not_know_field_by_field(make_config, caplog):
    from kdlab.engine.trainer import Trainer

    raw_cfg = make_config(name="parts", train={"epochs": 2})
    first = _StepCounter()
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(data=raw_cfg), callbacks=[first, _StopAfterSteps(6)]).fit()
    last = Path(raw_cfg["output_dir"]) / "parts" / "last.pt"
    on_disk = torch.load(last, weights_only=True)
    assert set(on_disk) == {"format", "version", "model", "model_state", "method", "config", "class_names", "state"}
    assert on_disk["state"]["callback/counter"] == {"steps": 6}
    assert on_disk["state"]["train"]["partial"]["batches"] == 2 and on_disk["state"]["train"]["epoch"] == 1
    # A component of another kdlab (or a callback this run lacks) is named in the log, not refused.
    on_disk["state"]["callback/gone"] = {"x": 1}
    torch.save(on_disk, last)
    again = _StepCounter()
    with caplog.at_level("INFO", logger="kdlab"):
        Trainer(load_config(data=raw_cfg), resume=True, callbacks=[again]).fit()
    assert again.loaded == {"steps": 6} and again.steps == 8
    assert "no use for (ignored): callback/gone" in caplog.text
    assert Checkpoint.load(last).train.step == 8 and Checkpoint.load(last).callbacks == {"counter": {"steps": 8}}
