"""benchmarks/gpu_check: one line and exit 0 without CUDA; the whole script path on CPU (--tiny);
its test counting and its arithmetic."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from tests.fakedata import write_imagefolder
except ImportError:  # tests/ itself on sys.path
    from fakedata import write_imagefolder  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check"


def _load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_it_is_an_executable_script():
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    done = _run(str(out), env={"CUDA_VISIBLE_DEVICES": ""})  # hides any GPU, as on a machine without one
    assert done.returncode == 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists()


def test_junit_counts_every_outcome(tmp_path):
    gc = _load_script()
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.test_amp" name="test_a[cuda]"/>
      <testcase classname="tests.test_amp" name="test_b[cuda]"><failure message="assert 1 == 2">x</failure></testcase>
      <testcase classname="tests.test_amp" name="test_c[cuda]"><error message="fixture broke"/></testcase>
      <testcase classname="tests.t" name="test_d[cuda]"><skipped message="CUDA is not available here"/></testcase>
      <testcase classname="tests.t" name="test_e[cuda]"><skipped message="CUDA is not available here"/></testcase>
    </testsuite></testsuites>""")
    got = gc.junit_counts(xml)
    assert {k: got[k] for k in ("collected", "passed", "failed", "errors", "skipped")} == {
        "collected": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert got["skip_reasons"] == {"CUDA is not available here": 2}
    assert [f["test"] for f in got["failures"]] == ["tests.test_amp::test_b[cuda]", "tests.test_amp::test_c[cuda]"]
    assert got["failures"][0]["message"] == "assert 1 == 2"


def test_epoch_time_is_the_median_after_the_first_epoch(tmp_path):
    gc = _load_script()
    rows = [{"epoch": e, "time_s": t} for e, t in enumerate([9.0, 2.0, 4.0, 3.0], 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "result.json").write_text(json.dumps({"last_top1": 71.23456, "best_top1": 72.0}))
    stats = gc.epoch_stats(tmp_path)
    assert stats["seconds_per_epoch"] == 3.0 and stats["epochs"] == 4 and stats["last_top1"] == 71.23
    (tmp_path / "result.json").write_text(json.dumps({"last": {"top1": 70.004}, "best": {"top1": 72.0}}))
    assert gc.epoch_stats(tmp_path)["last_top1"] == 70.0  # the current layout reads too
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert gc.epoch_stats(tmp_path)["seconds_per_epoch"] == 9.0  # one epoch: that one


def test_students_sharing_a_device_are_rated_over_the_span_of_their_last_epochs():
    gc = _load_script()
    # Two runs of 600 images whose last epochs (3 s and 4 s) overlap: 1200 images in the 5 s from
    # the first start (10) to the last end (15); each run alone 600 / 3 and 600 / 4 images/s.
    rates = gc.shared_device_rates([(10.0, 13.0, 3.0), (11.0, 15.0, 4.0)], 600)
    assert rates == {"images_per_second_all": 240, "images_per_second_per_run": 175}
    # Runs that did not overlap count as run one after another.
    assert gc.shared_device_rates([(0.0, 2.0, 2.0), (2.0, 4.0, 2.0)], 100)["images_per_second_all"] == 50


def test_a_runs_last_epoch_ends_when_its_metrics_were_last_written(tmp_path):
    gc = _load_script()
    rows = [{"epoch": 1, "time_s": 9.0}, {"epoch": 2, "time_s": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.utime(tmp_path / "metrics.jsonl", (1000.0, 1000.0))
    assert gc.training_span(tmp_path) == (997.5, 1000.0, 2.5)


def test_step_time_flags_are_read_from_its_source():
    flags = _load_script().supported_flags(ROOT / "benchmarks" / "step_time.py")
    assert {"--device", "--amp", "--channels-last", "--steps"} <= flags


@pytest.mark.slow
def test_tiny_cpu_run_covers_every_section_and_writes_both_summaries(tmp_path):
    data = write_imagefolder(tmp_path / "c10", 10, 2, size=32, splits=("train", "test"), ext="jpg")
    out = tmp_path / "out"
    done = _run(str(out), "--device", "cpu", "--tiny", "--data", str(data), "--scratch", str(tmp_path / "scratch"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    sec = summary["sections"]
    assert list(sec) == ["tests", "ddp", "step_time", "cifar10", "per_device"]
    tests = sec["tests"]
    assert tests["status"] == "ok" and tests["collected"] >= 8 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] + tests["passed"] == tests["collected"]
    assert sec["ddp"]["status"] == "skipped" and "two CUDA GPUs" in sec["ddp"]["reason"]
    assert sec["step_time"]["status"] == "ok" and "| kd |" in sec["step_time"]["table"]
    c10 = sec["cifar10"]
    assert c10["status"] == "ok" and c10["train_images"] == 20 and c10["cache"]["bytes"] == 20 * 162 * 10 * 2
    assert set(c10["runs"]) == {"dkd_standard", "dkd_standard_cache", "dkd_gpu", "dkd_gpu_cache", "dkd_gpu_sync"}
    for run in c10["runs"].values():
        assert run["status"] == "ok" and run["images_per_second"] > 0
        assert run["recipe_minutes"] == pytest.approx(240 * run["seconds_per_epoch"] / 60, abs=0.05)
        assert 0 <= run["last_top1"] <= 100
    shared = sec["per_device"]
    assert shared["status"] == "ok" and shared["images_per_run"] == 20 and list(shared["runs"]) == ["k1", "k2"]
    for k, run in ((1, shared["runs"]["k1"]), (2, shared["runs"]["k2"])):
        assert run["status"] == "ok" and f"--seeds {k} --jobs {k} --jobs-per-device {k}" in run["run"]["cmd"]
        assert run["images_per_second_all"] > 0 and run["images_per_second_per_run"] > 0
        assert run["threads_per_run"] == max(1, shared["cores"] // k)
        assert len(list((out / "runs" / "per_device" / f"k{k}").glob(f"k{k}_seed*/result.json"))) == k
    assert shared["runs"]["k1"]["vs_k1"] == 1.0
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Test suite, CUDA cases", "## 2-rank NCCL DDP", "## Step time", "## CIFAR-10",
                    "## Several students per GPU"):
        assert heading in md
    assert "| GPU-resident | cache | ok |" in md and "| 2 | ok |" in md and "every section passed" in md
