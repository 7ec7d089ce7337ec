"""Run folders: what a folder holds, one definition of "the same experiment", and the guard that
no command writes over an earlier run (issue 14: a second, unflagged run of train, train --seeds,
generations, reproduce or cache-teacher leaves the first run's files byte-identical; --resume and
--overwrite are the ways on). Also: a config file that is not UTF-8 is one error naming it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.config import config_to_dict, load_config
from kdlab.schema.compare import run_differences
from kdlab.engine.run_folder import RunFolder, RunFolderTaken, claim_cache_folder
from kdlab.errors import ConfigError, KDLabError

try:
    from tests.fakedata import write_cifar10
    from tests.speedkit import tiny_model_registered, write_teacher
except ImportError:  # tests/ itself on sys.path
    from fakedata import write_cifar10  # type: ignore[no-redef]
    from speedkit import tiny_model_registered, write_teacher  # type: ignore[no-redef]

TINY_DATA = {"train_subset": 64, "batch_size": 32}


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (relative path -> digest): what must not change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def fake_run(folder: Path, *, finished: bool = True, checkpoint: bool = True, config: dict | None = None) -> Path:
    """A run folder as the trainer leaves it, with arbitrary bytes where checkpoints go (the
    guard must refuse before anything reads them); `config`: the config it was trained with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config) if config is not None else "name: old\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": 50.0}) + "\n")
    if checkpoint:
        (folder / "last.pt").write_bytes(b"\x00old checkpoint\xff")
        (folder / "best.pt").write_bytes(b"\x00old best\xff")
    if finished:
        (folder / "result.json").write_text(json.dumps({"epochs": 1, "best_epoch": 1, "last_top1": 50.0}))
    (folder / "tb").mkdir(exist_ok=True)
    (folder / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"tb")
    return folder


def assert_refused(err: str, folder: Path) -> None:
    """One message naming the folder and the three ways on."""
    assert str(folder) in err and "--resume" in err and "name=" in err and "--overwrite" in err, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- the folder
def test_state_of_a_folder(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.holds_run() and not folder.is_finished() and folder.read_metrics() == []
    fake_run(folder.path, finished=False)
    assert folder.holds_run() and folder.has_checkpoint() and not folder.is_finished()
    assert [p.name for p in folder.checkpoints()] == ["last.pt", "best.pt"]
    folder.result_path.write_text('{"epochs": 1, "best_ep')  # killed while writing it
    assert not folder.is_finished()
    with pytest.raises(KDLabError, match="result.json is incomplete"):
        folder.read_result()
    folder.write_result({"epochs": 2, "best_epoch": 1, "last_top1": 60.0})
    assert folder.is_finished() and folder.read_result()["last_top1"] == 60.0
    assert not list(folder.path.glob(".result.json.*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="best_epoch"):
        folder.write_result({"epochs": 2})
    # A finished run whose checkpoints were deleted still holds its results.
    for p in folder.checkpoints():
        p.unlink()
    assert folder.holds_run() and not folder.has_checkpoint()


def test_metrics_reader(tmp_path):
    folder = RunFolder(tmp_path)
    rows = [{"epoch": 1, "stat/teacher_conf": 0.5}, {"epoch": 2, "stat/teacher_conf": 0.75}]
    folder.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 3, "st')
    assert folder.read_metrics() == rows  # the torn last line of a killed run is skipped
    assert folder.last_metric("stat/teacher_conf") == 0.75 and folder.last_metric("missing") is None
    folder.metrics_path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(KDLabError, match="line 2"):
        folder.read_metrics()


def test_claim_refuses_untouched_and_names_the_ways_on(tmp_path):
    folder = RunFolder(fake_run(tmp_path / "run"))
    before = snapshot(folder.path)
    with pytest.raises(RunFolderTaken) as info:
        folder.claim(retry="kdlab train c.yaml")
    assert_refused(str(info.value), folder.path)
    assert "kdlab train c.yaml --resume" in str(info.value) and "last.pt, best.pt; finished" in str(info.value)
    folder.claim(resume=True)
    folder.claim(resume="other/last.pt")
    folder.release()  # the claim's lock file goes with the lock (tests/test_run_safety.py)
    assert snapshot(folder.path) == before
    with pytest.raises(KDLabError, match="contradict"):
        folder.claim(resume=True, overwrite=True)
    folder.claim(overwrite=True, is_main=False)  # another rank: never deletes
    assert snapshot(folder.path) == before
    # A run killed in its first epoch (no checkpoint, no result) holds nothing to protect.
    RunFolder(fake_run(tmp_path / "young", finished=False, checkpoint=False)).claim()


def test_overwrite_clears_the_run_and_claiming_twice_is_harmless(tmp_path):
    folder = RunFolder(fake_run(tmp_path / "run"))
    (folder.path / "epoch_5.pt").write_bytes(b"x")
    (folder.path / "nested_run").mkdir()
    (folder.path / "nested_run" / "last.pt").write_bytes(b"another run")
    folder.claim(overwrite=True)
    folder.release()
    assert sorted(p.name for p in folder.path.iterdir()) == ["nested_run"]  # files and tb/ gone, sub-runs kept
    assert not folder.holds_run()
    folder.claim(overwrite=True)  # the trainer claims again after the command: nothing happens
    folder.claim()
    assert (folder.path / "nested_run" / "last.pt").read_bytes() == b"another run"


def test_cache_folder_guard(tmp_path):
    claim_cache_folder(tmp_path / "absent", overwrite=False)
    (tmp_path / "cache").mkdir()
    with pytest.raises(RunFolderTaken, match=r"cache already exists.*--out.*--overwrite"):
        claim_cache_folder(tmp_path / "cache", overwrite=False)
    claim_cache_folder(tmp_path / "cache", overwrite=True)
    assert (tmp_path / "cache").is_dir()  # the builder replaces it once the new one is complete


# ----------------------------------------------------------------------------- same experiment
def test_one_definition_of_the_same_experiment(tmp_path, make_config):
    cfg = load_config(data=make_config())
    saved = config_to_dict(cfg)
    folder = RunFolder.of(cfg)
    folder.path.mkdir(parents=True)
    folder.config_path.write_text(yaml.safe_dump(saved))
    assert folder.differences(cfg) == []
    # Where it runs, how fast, how it logs: the same experiment.
    moved = load_config(data=make_config(data={"root": "/elsewhere", "num_workers": 2},
                                         train={"device": "cpu", "progress": True, "tensorboard": True}))
    assert folder.differences(moved) == []
    # What is trained: another experiment, named key by key.
    other = load_config(data=make_config(optim={"lr": 0.2}, train={"epochs": 2}))
    assert folder.differences(other) == ["optim.lr: 0.05 -> 0.2", "train.epochs: 1 -> 2"]
    # A run saved before a setting existed reads with that setting's default: still the same.
    older = dict(saved)
    older.pop("task", None)
    older["train"] = {k: v for k, v in saved["train"].items() if k != "check_every"}
    folder.config_path.write_text(yaml.safe_dump(older))
    assert folder.differences(cfg) == []
    # Seeds of one group (kdlab results) may differ in their seed only.
    seeded = dict(saved, train=dict(saved["train"], seed=7))
    assert run_differences(saved, seeded) == ["train.seed: 0 -> 7"]
    assert run_differences(saved, seeded, across_seeds=True) == []


def test_results_flags_a_group_that_is_not_one_experiment(tmp_path, make_config):
    from kdlab.experiments.results import find_runs, group_runs

    for seed, lr in ((0, 0.05), (1, 0.05), (2, 0.3)):
        cfg = load_config(data=make_config(name=f"g_seed{seed}", train={"seed": seed}, optim={"lr": lr}))
        folder = RunFolder.of(cfg)
        folder.path.mkdir(parents=True)
        folder.config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
        folder.write_result({"epochs": 1, "best_epoch": 1, "last_top1": 50.0 + seed, "best_top1": 50.0,
                             "last_top5": 90.0, "best_top5": 90.0})
    (tmp_path / "runs/g_seed3").mkdir()
    (tmp_path / "runs/g_seed3/result.json").write_text("{")  # torn: not a finished run
    runs = find_runs(tmp_path / "runs")
    assert len(runs) == 3
    assert group_runs(runs[:2])[0].consistent
    assert not group_runs(runs)[0].consistent


# ----------------------------------------------------------------------------- not UTF-8
def test_config_that_is_not_utf8_is_one_error_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "utf16.yaml"
    bad.write_bytes(b"\xff\xfe\x00" + "name: x\n".encode("utf-16-le"))
    with pytest.raises(ConfigError, match=r"utf16.yaml' is not UTF-8 text \(byte 0xff at offset 0; it looks like "
                                          r"UTF-16\); save it as UTF-8"):
        load_config(bad)
    for command in (["train", str(bad)], ["generations", str(bad)], ["cache-teacher", str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "utf16.yaml' is not UTF-8 text" in err and "Traceback" not in err and len(err.splitlines()) == 1
    # A base file that is not UTF-8 is named too, and a UTF-8 byte-order mark is fine.
    (tmp_path / "child.yaml").write_text("base: [utf16.yaml]\n")
    with pytest.raises(ConfigError, match="utf16.yaml"):
        load_config(tmp_path / "child.yaml")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({"model": {"name": "resnet8"}}).encode())
    assert load_config(bom).model.name == "resnet8"


# ----------------------------------------------------------------------------- each command
def test_train_refuses_before_touching_anything(tmp_path, make_config, capsys):
    """Issue 14's data loss: a second run, and one with more epochs, into a finished run's folder."""
    path = write_config(tmp_path / "c.yaml", make_config(name="r"))
    run = fake_run(tmp_path / "runs/r")
    before = snapshot(run)
    for extra in ([], ["train.epochs=2"]):
        assert main(["train", str(path), *extra]) == 2
        assert_refused(capsys.readouterr().err, run)
        assert snapshot(run) == before


def test_train_seeds_refuses_before_the_first_seed(tmp_path, make_config, capsys):
    path = write_config(tmp_path / "c.yaml", make_config(name="s", data=TINY_DATA))
    second = fake_run(tmp_path / "runs/s_seed1")  # seed 0's folder is free, seed 1's is not
    before = snapshot(tmp_path / "runs")
    assert main(["train", str(path), "--seeds", "2"]) == 2
    assert_refused(capsys.readouterr().err, second)
    assert snapshot(tmp_path / "runs") == before and not (tmp_path / "runs/s_seed0").exists()


def test_train_end_to_end_refuse_resume_overwrite(tmp_path, make_config, capsys):
    path = write_config(tmp_path / "c.yaml", make_config(name="r", data=TINY_DATA))
    run = tmp_path / "runs/r"
    assert main(["train", str(path)]) == 0
    first = snapshot(run)
    assert {"last.pt", "best.pt", "result.json", "metrics.jsonl", "config.yaml"} <= set(first)
    for extra in ([], ["train.epochs=2"]):
        assert main(["train", str(path), *extra]) == 2
        assert_refused(capsys.readouterr().err, run)
        assert snapshot(run) == first
    # --resume of the finished run: it stays finished; with more epochs: refused (another
    # schedule, tests/test_run_safety.py), the run untouched.
    assert main(["train", str(path), "--resume"]) == 0
    assert snapshot(run) == first
    assert main(["train", str(path), "train.epochs=2", "--resume"]) == 2
    assert "train.epochs: 1 -> 2" in capsys.readouterr().err and snapshot(run) == first
    # --overwrite deletes the earlier run first (the files kdlab wrote, not the user's own).
    (run / "label_noise.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(path), "train.epochs=2", "--overwrite"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and not (run / "label_noise.json").exists()
    assert json.loads((run / "result.json").read_text())["epochs"] == 2 and (run / "notes.txt").read_text() == "mine"


def test_train_seeds_end_to_end(tmp_path, make_config, capsys):
    path = write_config(tmp_path / "c.yaml", make_config(name="s", data=TINY_DATA))
    assert main(["train", str(path), "--seeds", "2"]) == 0
    runs = tmp_path / "runs"
    first = snapshot(runs)
    assert main(["train", str(path), "--seeds", "2"]) == 2
    assert_refused(capsys.readouterr().err, runs / "s_seed0")
    assert snapshot(runs) == first
    lasts = {s: (runs / f"s_seed{s}/last.pt").read_bytes() for s in (0, 1)}
    assert main(["train", str(path), "--seeds", "2", "--resume"]) == 0  # finished seeds stay finished
    assert {s: (runs / f"s_seed{s}/last.pt").read_bytes() for s in (0, 1)} == lasts
    assert main(["train", str(path), "--seeds", "2", "--overwrite"]) == 0
    assert all((runs / f"s_seed{s}/result.json").is_file() for s in (0, 1))


def _chain_file(tmp_path, make_config) -> Path:
    exp = make_config(name="chain", data=TINY_DATA)
    chain = {"notation": "D(0.6, 0.6)", "generations": 1, "seed_offset": 0, "groups": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]}
    return write_config(tmp_path / "chain.yaml", {"experiment": exp, "chain": chain})


def test_generations_refuses_before_touching_anything(tmp_path, make_config, capsys):
    path = _chain_file(tmp_path, make_config)
    root = tmp_path / "runs/chain"
    fake_run(root / "gen0")
    (root / "chain.yaml").write_text("old chain\n")
    before = snapshot(root)
    assert main(["generations", str(path)]) == 2
    err = capsys.readouterr().err
    assert_refused(err, root)
    assert "gen0: last.pt, best.pt; finished" in err
    assert snapshot(root) == before
    assert main(["generations", str(path), "--dry-run"]) == 1  # the plan says so too
    assert "would refuse" in capsys.readouterr().err and snapshot(root) == before


def test_generations_end_to_end(tmp_path, make_config, capsys):
    path = _chain_file(tmp_path, make_config)
    root = tmp_path / "runs/chain"
    assert main(["-q", "generations", str(path)]) == 0
    first = snapshot(root)
    assert {"gen0/last.pt", "gen1/last.pt", "chain.yaml", "generations.md"} <= set(first)
    assert main(["generations", str(path)]) == 2
    assert_refused(capsys.readouterr().err, root)
    assert snapshot(root) == first
    # --resume: the finished generations are kept (the report is rewritten).
    assert main(["-q", "generations", str(path), "--resume"]) == 0
    after = snapshot(root)
    assert all(after[k] == v for k, v in first.items() if k.startswith("gen") and k.endswith(".pt"))
    # --overwrite: the old chain is deleted, then trained again.
    (root / "gen0/label_noise.json").write_text("{}")  # a record kdlab writes
    assert main(["-q", "generations", str(path), "--overwrite"]) == 0
    assert not (root / "gen0/label_noise.json").exists() and (root / "gen1/result.json").is_file()


def _reproduce_rows(tmp_path, make_config, monkeypatch):
    """A two-row table on digits (a teacher config and a KD row), served to `kdlab reproduce`."""
    from kdlab.reproduce import table
    from kdlab.reproduce.table import Row

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    write_config(cfg_dir / "teacher.yaml", make_config(name="t", data=TINY_DATA))
    write_config(cfg_dir / "kd.yaml", make_config(
        name="kd", data=TINY_DATA, teacher={"name": "resnet8", "checkpoint": "placeholder.pt"}, method={"name": "kd"}))
    rows = [Row("demo/kd", "p", "t", "digits", "kd", "configs/kd.yaml", 50.0, teacher_config="configs/teacher.yaml")]
    monkeypatch.setattr(table, "load_rows", lambda: rows)
    return ["reproduce", "demo/kd", "--root", str(tmp_path)]


def test_reproduce_refuses_before_touching_anything(tmp_path, make_config, monkeypatch, capsys):
    command = _reproduce_rows(tmp_path, make_config, monkeypatch)
    fake_run(tmp_path / "runs/kd", config=config_to_dict(load_config(tmp_path / "configs/kd.yaml")))
    before = snapshot(tmp_path / "runs")
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "demo/kd: cannot run" in err
    assert_refused(err, tmp_path / "runs/kd")
    assert snapshot(tmp_path / "runs") == before and not (tmp_path / "runs/t").exists()  # not even the teacher


def test_reproduce_end_to_end(tmp_path, make_config, monkeypatch, capsys):
    command = _reproduce_rows(tmp_path, make_config, monkeypatch)
    runs = tmp_path / "runs"
    assert main(["-q", *command]) == 0
    first = snapshot(runs)
    assert {"t/best.pt", "kd/last.pt", "kd/result.json"} <= set(first)
    assert main(command) == 1
    assert_refused(capsys.readouterr().err, runs / "kd")
    assert snapshot(runs) == first
    assert main(["-q", *command, "--resume"]) == 0  # finished runs reused: only read
    assert snapshot(runs) == first
    assert "measured" in capsys.readouterr().out
    (runs / "kd/label_noise.json").write_text("{}")  # a record kdlab writes
    assert main(["-q", *command, "--overwrite"]) == 0  # the row retrains; its finished teacher is reused
    assert not (runs / "kd/label_noise.json").exists()
    assert snapshot(runs / "t") == {k[2:]: v for k, v in first.items() if k.startswith("t/")}


def test_cache_teacher_refuses_overwrites_and_rebuilds(tmp_path, make_config, capsys):
    write_cifar10(tmp_path / "data", 8, 4)
    with tiny_model_registered() as tiny:
        teacher = write_teacher(tmp_path / "teacher.pt", tiny)
        raw = make_config(model={"name": tiny}, method={"name": "kd"},
                          teacher={"name": tiny, "checkpoint": str(teacher), "cache": str(tmp_path / "cache")},
                          data={"name": "cifar10", "root": str(tmp_path / "data"), "train_subset": None,
                                "batch_size": 4})
        path = write_config(tmp_path / "c.yaml", raw)
        assert main(["cache-teacher", str(path)]) == 0
        first = snapshot(tmp_path / "cache")
        assert main(["cache-teacher", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "cache") in err and "--overwrite" in err and "Traceback" not in err
        assert snapshot(tmp_path / "cache") == first
        (tmp_path / "cache" / "stale").write_text("x")
        assert main(["cache-teacher", str(path), "--overwrite"]) == 0
        assert not (tmp_path / "cache" / "stale").exists() and snapshot(tmp_path / "cache") == first
        assert main(["cache-teacher", str(path), "--force"]) == 0  # the option's old name still works
