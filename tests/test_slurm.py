"""`--launcher slurm` (kdlab.plan.slurm): the plan's jobs as submitit jobs. Without a cluster:
submitit's local executor runs the jobs as subprocesses, a fake sbatch/squeue records what
would be submitted, and submitit's own script generator shows the #SBATCH lines."""
from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.checkpoint import Checkpoint  # noqa: E402
from kdlab.engine.run_folder import RunFolder  # noqa: E402
from kdlab.errors import ConfigError, KDLabError  # noqa: E402
from kdlab.plan import ExecOptions, Job, Plan, execute  # noqa: E402
from kdlab.plan.slurm import JobRunner, _SlurmPlan, launcher_settings, make_executor  # noqa: E402

PREEMPTED = '''\
import os
import signal
from typing import Literal

from kdlab.methods import register_method
from kdlab.methods.vanilla import Vanilla, VanillaConfig


class PreemptConfig(VanillaConfig):
    name: Literal["{name}"] = "{name}"


SENT = []


@register_method("{name}")
class Preempt(Vanilla):
    """Trains as vanilla; at its first step Slurm's preemption signal arrives (once per process)."""
    Config = PreemptConfig

    def forward_train(self, batch, epoch):
        if not SENT:
            SENT.append(1)
            os.kill(os.getpid(), signal.SIGUSR2)
        return super().forward_train(batch, epoch)
'''

FAKE_SLURM = {
    # sbatch: records the script and prints a job id; with KDLAB_FAKE_RUN, runs a job that waits for
    # nothing at once, in the background, with the variables Slurm gives one task (a dependent stays queued).
    "sbatch": """#!/bin/sh
n=$(cat "$KDLAB_FAKE_SLURM/count" 2>/dev/null || echo 100)
n=$((n + 1))
echo $n > "$KDLAB_FAKE_SLURM/count"
cp "$1" "$KDLAB_FAKE_SLURM/job_$n.sh"
if [ -n "$KDLAB_FAKE_RUN" ] && ! grep -q -- --dependency "$1"; then
  SLURM_JOB_ID=$n SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_JOB_NUM_NODES=1 SLURM_NODEID=0 \
    sh "$1" </dev/null >/dev/null 2>&1 &
fi
echo "Submitted batch job $n"
""",
    "srun": """#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in --unbuffered) shift;; --output) out="$2"; shift 2;; --error) shift 2;; *) break;; esac
done
exec "$@" >> "$(echo "$out" | sed "s/%j/$SLURM_JOB_ID/; s/%t/0/")" 2>&1
""",
    "squeue": '#!/bin/sh\ncat "$KDLAB_FAKE_SLURM/queue" 2>/dev/null\n',
    "sacct": "#!/bin/sh\necho 'JobID|State|NodeList'\n",  # knows nothing: the result files tell
    "scancel": '#!/bin/sh\necho "$@" >> "$KDLAB_FAKE_SLURM/cancelled"\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch, srun, squeue, sacct and scancel on PATH, in a folder that records what they were asked."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, text in FAKE_SLURM.items():
        (fake / name).write_text(text)
        (fake / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KDLAB_FAKE_SLURM", str(fake))
    return fake


def _job(make_config, name: str, after=(), **sections) -> Job:
    return Job.train(load_config(data=make_config(name=name, **sections)), after=after)


def _teacher_and_student(make_config):
    teacher = _job(make_config, "teacher")
    kd = _job(make_config, "kd", after=[teacher.name], method={"name": "kd"},
              teacher={"name": "resnet8", "checkpoint": str(Path(teacher.run_dir) / "last.pt")})
    return teacher, kd


@pytest.mark.slow
def test_local_submitit_jobs_train_a_teacher_then_its_student_and_isolate_a_failure(make_config, tmp_path):
    teacher, kd = _teacher_and_student(make_config)
    broken = _job(make_config, "broken", method={"name": "kd"},
                  teacher={"name": "resnet8", "checkpoint": str(tmp_path / "none.pt")})
    after_broken = _job(make_config, "after_broken", after=[broken.name])
    folder = tmp_path / "submitit"
    options = ExecOptions(launcher="submitit-local", jobs=2, threads=1, status=False,
                          launcher_settings={"folder": str(folder)})
    report = execute(Plan("local jobs", [teacher, broken, kd, after_broken]), options)
    status = {Path(n).name: o.status for n, o in report.outcomes.items()}
    assert status == {"teacher": "done", "broken": "failed", "kd": "done", "after_broken": "skipped"}, report.table()
    assert "none.pt" in report.outcomes[broken.name].error
    assert Path(report.outcomes[broken.name].log).is_file() and report.exit_code() == 1
    result = RunFolder(kd.run_dir).read_result()  # the student's run, readable as any other
    assert result and RunFolder(kd.run_dir).read_metrics()[-1]["epoch"] == 1
    files = set(folder.iterdir())
    again = execute(Plan("local jobs", [teacher, kd]), options)
    assert {o.status for o in again.outcomes.values()} == {"reused"} and again.exit_code() == 0
    assert set(folder.iterdir()) == files  # nothing submitted


@pytest.mark.slow
def test_a_job_of_two_processes_trains_one_ddp_run(make_config, tmp_path):
    """gpus=2 on the CPU: two tasks (gloo), which find each other through the variables
    JobRunner exports; only rank 0 reports, as under torchrun."""
    job = Job.from_json({**_job(make_config, "ddp").to_json(), "gpus": 2})
    options = ExecOptions(launcher="submitit-local", threads=1, status=False,
                          launcher_settings={"folder": str(tmp_path / "submitit")})
    report = execute(Plan("ddp", [job]), options)
    outcome = report.outcomes[job.name]
    assert outcome.status == "done", report.table()
    rank0 = Path(outcome.log)
    rank1 = rank0.with_name(rank0.name.replace("_0_log", "_1_log"))
    assert "global_rank=1(2)" in rank1.read_text() and "epoch 1/1" not in rank1.read_text()
    assert "epoch 1/1" in rank0.read_text() and RunFolder(job.run_dir).is_finished()


def test_slurm_jobs_wait_for_their_dependencies_and_are_found_again_in_the_queue(make_config, tmp_path, fake_slurm):
    fake = fake_slurm
    teacher, kd = _teacher_and_student(make_config)
    plan = Plan("slurm", [teacher, kd], log_dir=tmp_path / "logs")
    options = ExecOptions(launcher="slurm", launcher_settings={"partition": "gpu", "wait": False})
    report = execute(plan, options)
    assert [report.outcomes[j.name].status for j in plan.jobs] == ["submitted", "submitted"]
    assert report.outcomes[kd.name].error == "Slurm job 102" and report.exit_code() == 0
    teacher_script, student_script = (fake / "job_101.sh").read_text(), (fake / "job_102.sh").read_text()
    assert "--dependency" not in teacher_script and "#SBATCH --partition=gpu" in teacher_script
    assert "#SBATCH --dependency=afterok:101\n" in student_script
    assert str(tmp_path / "logs" / "slurm") in student_script  # the default folder: <log_dir>/slurm

    (fake / "queue").write_text("101\n102\n")  # both still queued: the same command submits nothing
    again = execute(plan, options)
    assert {o.error for o in again.outcomes.values()} == {"Slurm job 101 (queued earlier)",
                                                         "Slurm job 102 (queued earlier)"}
    assert not (fake / "job_103.sh").exists()
    (fake / "queue").write_text("102\n")  # the teacher left the queue unfinished: submitted again
    third = execute(plan, options)
    assert [third.outcomes[j.name].error for j in plan.jobs] == ["Slurm job 103", "Slurm job 102 (queued earlier)"]


def test_ctrl_c_while_waiting_leaves_the_jobs_queued_for_the_next_command(make_config, tmp_path, fake_slurm,
                                                                         monkeypatch, capsys):
    def ctrl_c(self, outcomes):
        raise KeyboardInterrupt

    monkeypatch.setattr(_SlurmPlan, "collect", ctrl_c)
    plan = Plan("slurm", [_job(make_config, "teacher")], log_dir=tmp_path / "logs")
    with pytest.raises(KeyboardInterrupt):
        execute(plan, ExecOptions(launcher="slurm", status=False))
    assert "the Slurm jobs 101 stay queued" in capsys.readouterr().err
    (fake_slurm / "queue").write_text("101\n")
    again = execute(plan, ExecOptions(launcher="slurm", launcher_settings={"wait": False}))
    assert [o.error for o in again.outcomes.values()] == ["Slurm job 101 (queued earlier)"]


@pytest.mark.slow
def test_waiting_for_slurm_jobs_collects_done_and_failed_and_drops_the_dependents(make_config, tmp_path,
                                                                                   fake_slurm, monkeypatch):
    monkeypatch.setenv("KDLAB_FAKE_RUN", "1")
    monkeypatch.setattr(_SlurmPlan, "poll_s", 0.2)
    teacher = _job(make_config, "teacher")
    broken = _job(make_config, "broken", method={"name": "kd"},
                  teacher={"name": "resnet8", "checkpoint": str(tmp_path / "none.pt")})
    after_broken = _job(make_config, "after_broken", after=[broken.name])
    plan = Plan("slurm", [teacher, broken, after_broken], log_dir=tmp_path / "logs")
    report = execute(plan, ExecOptions(launcher="slurm", threads=1, status=False))
    assert [report.outcomes[j.name].status for j in plan.jobs] == ["done", "failed", "skipped"], report.table()
    assert "none.pt" in report.outcomes[broken.name].error and report.exit_code() == 1
    assert Path(report.outcomes[broken.name].log) == tmp_path / "logs" / "slurm" / "102_0_log.out"
    assert (fake_slurm / "cancelled").read_text().split() == ["103"]  # the job waiting for it leaves the queue
    assert RunFolder(teacher.run_dir).is_finished()


def test_the_sbatch_script_asks_for_the_resources_of_a_ddp_job(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were here
    job = _job(make_config, "ddp", train={"device": "cuda"})
    settings = launcher_settings({"partition": "gpu", "gpus_per_job": 4, "cpus_per_job": 8, "mem_gb": 64,
                                  "time_min": 120, "account": "lab", "sbatch": ["--exclusive"]})
    executor = make_executor("slurm", tmp_path, job, settings, after=["41", "42"])
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    lines = set(script.splitlines())
    for line in ["--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=2",
                 "--mem=64GB", "--time=120", "--account=lab", "--dependency=afterok:41:42", "--exclusive",
                 "--kill-on-invalid-dep=yes"]:
        assert f"#SBATCH {line}" in lines, script
    assert "export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 KDLAB_THREADS=2" in lines
    with pytest.raises(ConfigError, match="at least 4"):
        make_executor("slurm", tmp_path, job, launcher_settings({"gpus_per_job": 4, "cpus_per_job": 2}))


def test_preemption_saves_the_step_and_the_requeued_job_continues(make_config, tmp_path, method_plugin):
    plugin, name = method_plugin(PREEMPTED)  # forgotten afterwards: it signals whatever trains it
    fresh = _job(make_config, "pre", imports=[str(plugin)], method={"name": name})
    job = Job.from_json({**fresh.to_json(), "resume": False, "overwrite": True})
    requeues = []

    def submitit_handler(signum, frame):  # what submitit does: checkpoint(), requeue, exit
        requeues.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            JobRunner(job)()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    folder = RunFolder(job.run_dir)
    assert requeues == [signal.SIGUSR2] and not folder.is_finished()
    assert Checkpoint.load(folder.checkpoint("last")).partial["batches"] == 1  # saved at the end of its step
    requeued = JobRunner(job).checkpoint()
    assert requeued.function.job == job.resumed() and (requeued.function.job.resume, requeued.function.job.overwrite) \
        == (True, False)
    requeued.result()  # the requeued job runs: the run continues from the step it saved
    assert folder.is_finished() and [row["epoch"] for row in folder.read_metrics()] == [1]


def test_a_job_slurm_requeued_itself_resumes_its_run(make_config, monkeypatch):
    """PreemptMode=REQUEUE: Slurm starts the first attempt's pickle again; it must not start over."""
    import kdlab.plan.slurm as slurm

    job = Job.from_json({**_job(make_config, "again").to_json(), "resume": False, "overwrite": True})
    ran = []
    monkeypatch.setattr(slurm, "run_job", ran.append)
    JobRunner(job)()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    JobRunner(job)()
    assert ran == [job, job.resumed()]


def test_bad_launcher_settings_are_one_error_naming_the_key(make_config, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'partion'; did you mean 'partition'") as err:
        launcher_settings({"partion": "gpu", "time_min": 60})
    assert str(err.value).count("\n  - ") == 1
    with pytest.raises(ConfigError, match="long option"):
        launcher_settings({"sbatch": ["-N 2"]})
    with pytest.raises(ConfigError, match="sets --dependency itself"):
        launcher_settings({"sbatch": ["--dependency=afterany:1"]})
    plan = Plan("p", [_job(make_config, "t")])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(KDLabError, match="sbatch, which is not on this machine's PATH"):
        execute(plan, ExecOptions(launcher="slurm"))
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(KDLabError, match=r"pip install 'kdlab\[slurm\]'"):
        execute(plan, ExecOptions(launcher="slurm"))


def test_launcher_config_is_read_by_every_command_that_takes_launcher(tmp_path):
    """--launcher-config (commands/_common.py) on train, generations, reproduce, demo and sweep:
    a mapping or a file's launcher: block; its keys override the sweep file's block; without
    --launcher slurm, or unreadable, or not a mapping, it is one error naming the fix."""
    from kdlab.cli import build_parser

    parser = build_parser()
    (tmp_path / "plain.yaml").write_text("partition: gpu\ntime_min: 60\n")
    (tmp_path / "block.yaml").write_text("launcher: {partition: long, mem_gb: 32}\n")
    (tmp_path / "list.yaml").write_text("- partition\n")
    from kdlab.commands._common import exec_options

    for argv in (["train", "c.yaml", "--seeds", "2"], ["generations", "c.yaml"], ["reproduce", "dkd/*"],
                 ["demo"], ["sweep", "s.yaml"]):
        args = parser.parse_args([*argv, "--launcher", "slurm", "--launcher-config", str(tmp_path / "plain.yaml")])
        assert exec_options(args).launcher_settings == {"partition": "gpu", "time_min": 60}, argv
    args = parser.parse_args(["sweep", "s.yaml", "--launcher", "slurm", "--launcher-config", str(tmp_path / "block.yaml")])
    assert exec_options(args, {"partition": "gpu", "gpus_per_job": 2}).launcher_settings == \
        {"partition": "long", "gpus_per_job": 2, "mem_gb": 32}
    local = parser.parse_args(["train", "c.yaml", "--launcher-config", str(tmp_path / "plain.yaml")])
    with pytest.raises(ConfigError, match="add --launcher slurm"):
        exec_options(local)
    for name, match in (("missing.yaml", "cannot read it"), ("list.yaml", "must be a YAML mapping")):
        args = parser.parse_args(["train", "c.yaml", "--launcher", "slurm", "--launcher-config", str(tmp_path / name)])
        with pytest.raises(ConfigError, match=match):
            exec_options(args)
