"""The versioned checkpoint type: round trip, today's (version 1) files, version checks, and
corrupt or foreign files refused without PyTorch's unsafe advice (issue 14)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdlab.cli import main
from kdlab.config import config_to_dict, load_config
from kdlab.engine.build import build_distiller
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
    # Saved again, it is a version-2 file with `best` instead of best_top1/best_top5.
    again = path.with_name("again.pt")
    ckpt.save(again)
    on_disk = torch.load(again, weights_only=True)
    assert on_disk["version"] == CURRENT_VERSION == 2 and on_disk["best"] == {"top1": 61.5, "top5": 94.5}
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
    assert Checkpoint(ModelRecord("det", 3, {}), {}, best={"bbox_ap": 0.3}).best == {"bbox_ap": 0.3}


def _saved(tmp_path, **changes) -> Path:
    d = Checkpoint.for_model(create_model("resnet8", num_classes=10), "resnet8", 10).to_dict()
    d.update(changes)
    torch.save(d, tmp_path / "x.pt")
    return tmp_path / "x.pt"


def test_a_newer_version_is_refused_naming_both_versions(tmp_path):
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(_saved(tmp_path, version=3))
    msg = str(info.value)
    assert "written by a newer kdlab (format version 3)" in msg and "reads 'kdlab-checkpoint' versions 1-2" in msg
    assert msg.endswith("upgrade kdlab")


@pytest.mark.parametrize("version", [0, "2", None])
def test_an_unknown_version_is_refused(tmp_path, version):
    with pytest.raises(CheckpointError, match=r"unknown format version .*versions 1-2"):
        Checkpoint.load(_saved(tmp_path, version=version))


def test_an_unknown_format_marker_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"format 'kdlab-checkpoint-ng', which this kdlab does not know .*"
                                              r"versions 1-2.*upgrade kdlab"):
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
