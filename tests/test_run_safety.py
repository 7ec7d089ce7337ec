"""Nothing lost, even by mistake (issue 21, findings 1, 2, 3, 8, 10 and the over-long name of 7).

- A run name stays inside output_dir, and --overwrite deletes only the files kdlab writes.
- One writer per run folder: an OS file lock, released by the kernel when its process dies; a
  second writer (another real process here) is told which process holds the folder.
- --resume continues only the same experiment (kdlab.schema.compare), never rewrites config.yaml,
  and refuses a longer schedule with the way on; the refusal hint repeats the user's overrides;
  a command that fails before training leaves no folder behind; `kdlab eval RUN_DIR` works.
- Checkpoints are readable like the other run files (the umask), and a permission error, a refused
  pickle and a corrupt file get three different messages (each produced for real with the pinned torch).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kdlab import cli as kdlab_cli
from kdlab.cli import main
from kdlab.config import load_config
from kdlab.engine.checkpoint import Checkpoint, atomic_save
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import CheckpointError, ConfigError

try:
    from tests.test_run_folder import snapshot, write_config
except ImportError:  # tests/ itself on sys.path
    from test_run_folder import snapshot, write_config  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"train_subset": 64, "batch_size": 32}


@pytest.fixture
def trained(tmp_path, make_config):
    """A finished one-epoch run `runs/r` and the config file that trained it."""
    path = write_config(tmp_path / "c.yaml", make_config(name="r", data=TINY_DATA))
    assert main(["-q", "train", str(path)]) == 0
    return path, tmp_path / "runs" / "r"


# ----------------------------------------------------------------------------- 1: names
@pytest.mark.parametrize("name", ["..", "", ".", "../x", "a/../../b", "/tmp/elsewhere", "a//b", "x" * 300,
                                  "a\0b"])
def test_a_run_name_that_leaves_output_dir_is_one_config_error(make_config, name):
    with pytest.raises(ConfigError, match=r"name") as info:
        load_config(data=make_config(name=name))
    assert "name=<" in str(info.value)  # the fix: another name
    if len(name) == 300:
        assert "255" in str(info.value)


def test_a_sub_path_name_is_a_folder_inside_output_dir(make_config):
    cfg = load_config(data=make_config(name="cifar100/kd_run"))
    assert RunFolder.of(cfg).path == Path(cfg.output_dir) / "cifar100" / "kd_run"


def test_overwrite_with_a_bad_name_deletes_nothing(tmp_path, make_config, capsys):
    """The probe of finding 1: `name=.. --overwrite` deleted a file the user had put beside the runs."""
    (tmp_path / "precious.txt").write_text("mine")
    path = write_config(tmp_path / "c.yaml", make_config(data=TINY_DATA))
    for name in ("..", "", ".", f"../{tmp_path.name}", str(tmp_path), "y" * 300):
        assert main(["train", str(path), f"name={name}", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "name" in err and "Traceback" not in err, err
    assert (tmp_path / "precious.txt").read_text() == "mine" and (tmp_path / "c.yaml").is_file()
    assert not (tmp_path / "runs").exists()


def test_overwrite_deletes_only_the_files_kdlab_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    kdlab_files = ["config.yaml", "metrics.jsonl", "last.pt", "best.pt", "epoch_3.pt", "result.json",
                   "label_noise.json", "noisy_labels.npy", "nckd_split.json", "nckd_split_indices.npy",
                   ".last.pt.abc123.tmp", "tb/events.out.tfevents.1.host.1.0"]
    for name in kdlab_files:
        (run / name).write_bytes(b"kdlab")
    users = ["notes.txt", "plot.png", "tb/my_notes.txt", "analysis/report.md", "epoch_final.pt"]
    for name in users:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("the user's")
    removed = RunFolder(run).clear()
    assert sorted(str(p.relative_to(run)) for p in removed) == sorted(kdlab_files)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(users)


def test_overwrite_never_deletes_a_folder_kdlab_did_not_create(tmp_path):
    run = tmp_path / "run"
    (run / "tb" / "mine").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1").write_bytes(b"kdlab")
    (run / "last.pt").write_bytes(b"kdlab")
    RunFolder(run).clear()
    assert (run / "tb" / "mine").is_dir()  # tb/ is kept while it holds what kdlab did not write
    (run / "tb" / "mine").rmdir()
    (run / "tb" / "events.out.tfevents.2").write_bytes(b"kdlab")
    RunFolder(run).clear()
    assert not (run / "tb").exists() and run.is_dir()


# ----------------------------------------------------------------------------- 2: one writer
HOLDER = """
import sys, time
from kdlab.engine.run_folder import RunFolder
RunFolder(sys.argv[1]).claim(resume=sys.argv[2] == "resume")
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def holder(folder: Path, resume: bool = False):
    """Another real process holding `folder` (as a training process does) until it is SIGKILLed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "resume" if resume else "-"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read()
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_process(tmp_path, trained, capsys):
    path, run = trained
    with holder(run, resume=True) as other:
        before = snapshot(run)
        for flags in ([], ["--overwrite"], ["--resume"]):
            assert main(["train", str(path), *flags]) == 2
            err = capsys.readouterr().err
            assert f"pid {other.pid}" in err and socket.gethostname() in err and str(run) in err, err
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
            assert snapshot(run) == before  # --overwrite deleted nothing under the other's feet
    # The holder was SIGKILLed: the kernel released its lock, nothing stale is left to clean up.
    assert (run / ".kdlab.lock").exists()
    assert main(["-q", "train", str(path), "--overwrite"]) == 0
    assert (run / "result.json").is_file() and not (run / ".kdlab.lock").exists()


@pytest.mark.slow
def test_two_trainers_started_together_write_one_run(tmp_path, make_config):
    """The probe of finding 2: two `kdlab train` into one folder both exited 0, every epoch logged twice."""
    path = write_config(tmp_path / "c.yaml", make_config(name="r", data=TINY_DATA, train={"epochs": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "kdlab", "-q", "train", str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    assert "pid" in err or "already holds" in err, err
    rows = [json.loads(line) for line in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


# ----------------------------------------------------------------------------- 3, 10: resume
def test_resume_refuses_another_experiment_and_lists_the_keys(trained, capsys):
    path, run = trained
    before = snapshot(run)
    assert main(["train", str(path), "optim.lr=0.2", "schedule.name=cosine", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.05 -> 0.2" in err and "schedule.name: 'constant' -> 'cosine'" in err, err
    assert f"{run / 'config.yaml'} --resume" in err  # the way on: continue the run as it was
    assert snapshot(run) == before


def test_resume_may_change_where_and_how_fast_and_never_rewrites_config_yaml(trained, capsys):
    path, run = trained
    saved = (run / "config.yaml").read_bytes()
    assert main(["-q", "train", str(path), "data.root=/elsewhere", "data.num_workers=0", "train.progress=true",
                 "--resume"]) == 0
    assert (run / "config.yaml").read_bytes() == saved


def test_a_hand_edited_config_yaml_is_not_overwritten_and_is_compared(trained, capsys):
    path, run = trained
    edited = (run / "config.yaml").read_text().replace("lr: 0.05", "lr: 0.3")
    (run / "config.yaml").write_text(edited)
    assert main(["train", str(path), "--resume"]) == 2
    assert "optim.lr: 0.3 -> 0.05" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == edited


def test_resume_with_more_epochs_is_refused_with_the_way_on(trained, capsys):
    """Finding 10: `--resume train.epochs=3` on a finished run trained on at lr 0 and rewrote result.json."""
    path, run = trained
    before = snapshot(run)
    assert main(["train", str(path), "train.epochs=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 -> 2" in err and "model.checkpoint=" in err and "name=<new name>" in err, err
    assert snapshot(run) == before


def test_resume_from_a_checkpoint_of_another_experiment_is_refused(trained, make_config, tmp_path, capsys):
    path, run = trained
    assert main(["train", str(path), "name=other", "optim.lr=0.2", f"--resume={run / 'last.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.05 -> 0.2" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs" / "other").exists()  # refused before anything was written


def test_the_refusal_hint_repeats_the_overrides(trained, capsys):
    path, run = trained
    assert main(["train", str(path), "optim.lr=0.05", "data.root=/my data"]) == 2
    err = capsys.readouterr().err
    cmd = shlex.join(["kdlab", "train", str(path), "optim.lr=0.05", "data.root=/my data"])
    assert f"{cmd} --resume" in err and f"{cmd} --overwrite" in err, err


def test_a_command_that_fails_before_training_leaves_no_folder(tmp_path, make_config, capsys):
    path = write_config(tmp_path / "c.yaml", make_config(name="v", data=TINY_DATA))
    bad = ["method.name=kd", "teacher.name=resnet8", f"teacher.checkpoint={tmp_path / 'missing.pt'}"]
    assert main(["train", str(path), *bad]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["train", str(path), *bad, "--seeds", "2"]) == 2
    assert not (tmp_path / "runs").exists()


def test_eval_of_a_run_folder_uses_its_best_then_last_checkpoint(trained, capsys):
    path, run = trained
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == str(run / "best.pt") and out["top1"] >= 0
    (run / "best.pt").unlink()
    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(run / "last.pt")
    (run / "last.pt").unlink()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "does not exist" not in err, err


# ----------------------------------------------------------------------------- 8: checkpoint files
def test_run_files_follow_the_umask(tmp_path, make_config):
    old = os.umask(0o027)
    try:
        path = write_config(tmp_path / "c.yaml", make_config(name="r", data=TINY_DATA))
        assert main(["-q", "train", str(path)]) == 0
        atomic_save({"x": 1}, tmp_path / "direct.pt")
    finally:
        os.umask(old)
    run = tmp_path / "runs/r"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*run.iterdir(), tmp_path / "direct.pt"] if p.is_file()}
    assert set(modes.values()) == {0o640}, modes


@contextlib.contextmanager
def as_another_user():
    """Run the block without root's right to read every file (a no-op for other users): the
    permission errors below are the operating system's own."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


class Payload:
    """A pickle that would run code when unpickled (writes `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, for the protocol-4 pickles
def test_permission_refused_pickle_and_corrupt_file_are_told_apart(tmp_path, capsys, monkeypatch):
    shared = Path(tempfile.mkdtemp(prefix="kdlab-perm-"))
    try:
        shared.chmod(0o755)
        good = shared / "good.pt"
        atomic_save({"format": "kdlab-checkpoint", "x": torch.zeros(3)}, good)
        good.chmod(0o000)
        # The other user may not read the checkout or the venv (a clone in a 0700 folder): list
        # the commands and load every module `kdlab eval` imports while still root, so that the
        # only file the other user is refused is the checkpoint.
        commands = list(kdlab_cli._commands())
        monkeypatch.setattr(kdlab_cli, "_commands", lambda: iter(commands))
        (shared / "empty.pt").write_bytes(b"")
        assert main(["eval", str(shared / "empty.pt")]) == 2
        capsys.readouterr()
        with as_another_user():
            with pytest.raises(CheckpointError) as info:
                Checkpoint.load(good)
            assert main(["eval", str(good)]) == 2
        denied = str(info.value)
    finally:
        good.chmod(0o644)
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()
    assert "permission" in denied.lower() and "corrupt" not in denied and "chmod" in denied, denied
    err = capsys.readouterr().err
    assert "permission" in err.lower() and "Traceback" not in err, err

    marker = tmp_path / "payload_ran"
    refused = {}
    torch.save({"a": Payload(marker)}, tmp_path / "system.pt")  # a blocked module (posix)
    torch.save({"a": Payload(marker)}, tmp_path / "system_p4.pt", pickle_protocol=4)  # STACK_GLOBAL
    torch.save({"a": datetime.date(2020, 1, 1)}, tmp_path / "date.pt")  # not allowed by default
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump({"a": Payload(marker)}, f)  # a plain pickle, not torch.save's zip
    for name in ("system.pt", "system_p4.pt", "date.pt", "raw.pt"):
        with pytest.raises(CheckpointError) as info:
            Checkpoint.load(tmp_path / name)
        refused[name] = str(info.value).replace(str(tmp_path), "DIR")
    assert not marker.exists()  # no payload ran
    for name, text in refused.items():
        assert "pickled Python objects" in text and "corrupt" not in text and "permission" not in text, (name, text)
    assert "system" in refused["system.pt"] and "datetime.date" in refused["date.pt"]

    data = (tmp_path / "date.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a torch file at all\n" * 10)
    for name in ("trunc.pt", "empty.pt", "text.pt"):
        with pytest.raises(CheckpointError) as info:
            Checkpoint.load(tmp_path / name)
        text = str(info.value).replace(str(tmp_path), "DIR")
        assert "corrupt" in text and "pickled" not in text and "permission" not in text, (name, text)


def test_the_readme_lists_what_may_change_on_resume():
    from kdlab.schema.compare import VOLATILE

    readme = (ROOT / "README.md").read_text()
    documented = readme[readme.index("What may change on resume"):readme.index("never rewrites `config.yaml`")]
    missing = [f"{s}.{k}" for s, keys in VOLATILE.items() for k in sorted(keys) if f"`{s}.{k}`" not in documented]
    assert not missing, f"README's list of what may change on --resume lacks {missing}"
