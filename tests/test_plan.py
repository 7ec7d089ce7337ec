"""The plan executor (kdlab.plan): dependencies, reuse of finished runs, failure isolation, the
table of outcomes, parallel workers with divided cores and results independent of what ran
beside them, a crashed worker, and a killed command continued by running it again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import load_config
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import ConfigError
from kdlab.plan import ExecOptions, Job, Plan, execute
from kdlab.plan.executor import threads_per_job, worker_env

KILLER = '''\
import os
import signal
from typing import Literal

from kdlab.methods import register_method
from kdlab.methods.base import Distiller
from kdlab.schema import MethodConfig


class KillConfig(MethodConfig):
    name: Literal["{name}"] = "{name}"


@register_method("{name}")
class Kill(Distiller):
    """Dies at its first training step the way an out-of-memory kill does: SIGKILL, no message."""
    Config = KillConfig
    requires_teacher = False

    def forward_train(self, batch, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
'''


def _job(make_config, name: str, after=(), **sections) -> Job:
    return Job.train(load_config(data=make_config(name=name, **sections)), after=after)


def _teacher_and_students(make_config, tmp_path):
    teacher = _job(make_config, "teacher")
    ckpt = str(Path(teacher.run_dir) / "last.pt")
    kd = _job(make_config, "kd", after=[teacher.name], teacher={"name": "resnet8", "checkpoint": ckpt},
              method={"name": "kd"})
    return teacher, kd


def _weights(run_dir: str) -> dict:
    state = torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=False)
    return dict(state["model_state"])


def test_plan_refuses_unknown_dependencies_cycles_and_two_configs_for_one_folder(make_config):
    a = _job(make_config, "a")
    with pytest.raises(ConfigError, match="not in the plan"):
        Plan("p", [Job(**{**a.to_json(), "after": ("nowhere",)})]).check()
    x = Job(**{**a.to_json(), "name": "x", "after": ("y",)})
    y = Job(**{**a.to_json(), "name": "y", "after": ("x",)})
    with pytest.raises(ConfigError, match="cycle"):
        Plan("p", [x, y]).check()
    plan = Plan("p")
    plan.add(a)
    plan.add(Job(**{**a.to_json(), "after": ("b",)}))  # the same run planned twice: one job, waits merged
    assert len(plan.jobs) == 1 and plan.jobs[0].after == ("b",)
    other = _job(make_config, "a", optim={"lr": 0.2})
    with pytest.raises(ConfigError, match="planned twice"):
        plan.add(other)


def test_failure_is_isolated_dependents_skipped_and_a_second_run_trains_nothing(make_config, tmp_path):
    teacher, kd = _teacher_and_students(make_config, tmp_path)
    # A student whose teacher file does not exist fails at train time; the one waiting for it is skipped.
    broken = _job(make_config, "broken", teacher={"name": "resnet8", "checkpoint": str(tmp_path / "none.pt")},
                  method={"name": "kd"})
    after_broken = _job(make_config, "after_broken", after=[broken.name])
    plan = Plan("test plan", [teacher, broken, kd, after_broken])
    report = execute(plan)
    status = {Path(n).name: o.status for n, o in report.outcomes.items()}
    assert status == {"teacher": "done", "broken": "failed", "kd": "done", "after_broken": "skipped"}
    assert "none.pt" in report.outcomes[broken.name].error
    assert report.exit_code() == 1
    table = report.table()
    assert "failed" in table and "skipped" in table and "2 done" in table
    mtimes = {j.name: (Path(j.run_dir) / "last.pt").stat().st_mtime_ns for j in (teacher, kd)}
    again = execute(Plan("test plan", [teacher, kd]))
    assert {o.status for o in again.outcomes.values()} == {"reused"} and again.exit_code() == 0
    assert mtimes == {j.name: (Path(j.run_dir) / "last.pt").stat().st_mtime_ns for j in (teacher, kd)}


def test_threads_are_divided_among_the_jobs():
    assert threads_per_job(1, cores=8) == 8
    assert threads_per_job(3, cores=8) == 2
    assert threads_per_job(4, cores=2) == 1  # never zero
    env = worker_env(3, device=1)
    assert env["OMP_NUM_THREADS"] == env["KDLAB_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(ConfigError, match="--jobs"):
        ExecOptions(jobs=0)


@pytest.mark.slow
def test_parallel_workers_train_what_one_process_trains(make_config, tmp_path):
    """Two runs at once in worker processes (one thread each) end with the weights that the
    same configs reach in this process with one thread: a result does not depend on what ran beside it."""
    configs = [load_config(data=make_config(name=f"p{k}", train={"seed": k})) for k in range(2)]
    parallel = Plan("parallel", [Job.train(c) for c in configs], log_dir=tmp_path / "logs")
    report = execute(parallel, ExecOptions(jobs=2, threads=1, status=False))
    assert report.exit_code() == 0, report.table()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["p0.log", "p1.log"]
    assert "1 thread(s)" in (tmp_path / "logs" / "p0.log").read_text()
    assert torch.get_num_threads() == 1  # tests/conftest.py
    alone = [Job.train(c, run_dir=tmp_path / "alone" / c.name) for c in configs]
    assert execute(Plan("alone", alone)).exit_code() == 0
    for p, a in zip(parallel.jobs, alone):
        wp, wa = _weights(p.run_dir), _weights(a.run_dir)
        assert wp.keys() == wa.keys() and all(torch.equal(wp[k], wa[k]) for k in wp)


@pytest.mark.slow
def test_a_crashed_worker_is_one_failed_run(make_config, tmp_path, method_plugin):
    plugin, name = method_plugin(KILLER)  # forgotten afterwards: it SIGKILLs whatever trains it
    crash = _job(make_config, "crash", imports=[str(plugin)], method={"name": name})
    waits = _job(make_config, "waits", after=[crash.name])
    fine = _job(make_config, "fine")
    report = execute(Plan("crash", [crash, waits, fine], log_dir=tmp_path / "logs"),
                     ExecOptions(jobs=2, threads=1, status=False))
    status = {Path(n).name: o.status for n, o in report.outcomes.items()}
    assert status == {"crash": "failed", "waits": "skipped", "fine": "done"}
    assert "signal 9" in report.outcomes[crash.name].error
    assert not RunFolder(crash.run_dir).busy()  # the dead worker's lock went with it


@pytest.mark.slow
def test_killed_seeds_command_continues_where_it_stopped(make_config, tmp_path):
    """`kdlab train --seeds 2 --jobs 2` killed with SIGKILL while both seeds train: its workers
    save their place and stop; the same command with --resume finishes both, each epoch logged once."""
    raw = make_config(name="s", train={"epochs": 4}, data={"train_subset": 512})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    runs = Path(raw["output_dir"])
    cmd = [sys.executable, "-m", "kdlab", "-q", "train", str(path), "--seeds", "2", "--jobs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = [runs / f"s_seed{k}" / "metrics.jsonl" for k in range(2)]
    deadline = time.monotonic() + 120
    while not all(m.is_file() and m.read_text().count("\n") >= 1 for m in metrics):
        assert parent.poll() is None and time.monotonic() < deadline, "the seeds did not start training"
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while any(RunFolder(runs / f"s_seed{k}").busy() for k in range(2)):  # the workers saw their parent die
        assert time.monotonic() < deadline, "the workers outlived the killed command"
        time.sleep(0.2)
    assert not all(RunFolder(runs / f"s_seed{k}").is_finished() for k in range(2))
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for m in metrics:
        epochs = [yaml.safe_load(line)["epoch"] for line in m.read_text().splitlines()]
        assert epochs == [1, 2, 3, 4] or epochs == [0, 1, 2, 3]
    assert main(["-q", "train", str(path), "--seeds", "2", "--jobs", "2", "--resume"]) == 0  # nothing left to do


def test_a_lone_run_on_busy_cores_drops_to_the_free_ones(monkeypatch, caplog):
    import logging

    from kdlab.engine import device

    logger = logging.getLogger("kdlab.test")
    before = torch.get_num_threads()
    monkeypatch.setattr(device.os, "cpu_count", lambda: 4)
    for var in device.THREAD_ENV:
        monkeypatch.delenv(var, raising=False)
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(device, "runnable_elsewhere", lambda: 0)
        assert device.share_busy_cores(logger) == 4  # an idle machine: unchanged
        monkeypatch.setattr(device, "runnable_elsewhere", lambda: 3)
        with caplog.at_level(logging.WARNING, logger="kdlab.test"):
            assert device.share_busy_cores(logger) == 1 and torch.get_num_threads() == 1
        assert "instead of 4" in caplog.text
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own count is kept, and warned about
        assert device.share_busy_cores(logger) == 4 and torch.get_num_threads() == 4
        assert "OMP_NUM_THREADS=1" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_runnable_elsewhere_reads_the_kernel():
    from kdlab.engine.device import runnable_elsewhere

    if not Path("/proc/loadavg").is_file():
        pytest.skip("no /proc/loadavg here")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.5)
        assert runnable_elsewhere() >= 1  # the spinning child at least
    finally:
        busy.kill()
