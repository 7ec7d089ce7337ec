"""benchmarks/step_time.py runs end to end and its ratios are computed from its own timings.

Speed itself is never asserted here (the suite shares 2 cores); only that the table is
complete and consistent.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from kdlab.engine.teacher_cache import TeacherCache, TeacherFeed
from kdlab.data.views import ViewSpec

try:
    from tests.speedkit import tiny_model_registered
except ImportError:  # tests/ itself on sys.path
    from speedkit import tiny_model_registered  # type: ignore[no-redef]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("kdlab_step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_step_time_table_has_every_mode_and_consistent_ratios(step_time, tmp_path, capsys):
    raw = tmp_path / "times.json"
    threads = torch.get_num_threads()
    try:
        with tiny_model_registered() as tiny:
            step_time.main(["--teacher", tiny, "--student", tiny, "--batch", "8", "--classes", "10",
                            "--steps", "2", "--warmup", "1", "--rounds", "2", "--threads", "1",
                            "--methods", "kd,dkd,tolerant", "--json", str(raw), "--profile"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    raw_times = json.loads(raw.read_text())
    names = list(raw_times)
    times = {n: raw_times[n]["times"] for n in names}
    rounds = {n: raw_times[n]["rounds"] for n in names}
    student_name, teacher_name = names[:2]
    assert (student_name, teacher_name) == (f"student alone ({tiny})", f"teacher forward ({tiny}, no grad)")
    assert {"kd", "dkd", "tolerant (no teacher)", "kd from teacher cache", "dkd from teacher cache"} <= set(names)
    assert all(len(t) == 2 and len(rounds[n]) == 2 for n, t in times.items())  # 2 rounds x 1 step
    main_table = out.split("Where the time goes")[0]
    rows = {line.split("|")[1].strip(): line.split("|") for line in main_table.splitlines() if line.startswith("| ")}
    floor = statistics.median(times[student_name]) + statistics.median(times[teacher_name])
    assert float(rows["kd"][5]) == pytest.approx(statistics.median(times["kd"]) / floor, abs=1e-3)
    paired = statistics.median(k / (s + t) for k, s, t in zip(rounds["kd"], rounds[student_name], rounds[teacher_name]))
    assert float(rows["kd"][6]) == pytest.approx(paired, abs=1e-3)
    cached = statistics.median(c / s for c, s in zip(rounds["kd from teacher cache"], rounds[student_name]))
    assert float(rows["kd from teacher cache"][7]) == pytest.approx(cached, abs=1e-3)
    assert rows["kd from teacher cache"][5].strip() == ""  # no teacher: no ratio to the floor
    assert "teacher forward" in out and "data.pipeline=gpu" in out  # the profile tables


def test_device_table_lookup_equals_the_memory_mapped_lookup(tmp_path, device):
    # The GPU path (whole table in device memory, `to_device`), on CPU and on CUDA where present.
    from kdlab.engine.teacher_cache import FORMAT, LOGITS_FILE, META_FILE, VERSION
    import numpy as np

    n, v, c = 20, 162, 7
    (tmp_path / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "shape": [n, v, c]}))
    mm = np.memmap(tmp_path / LOGITS_FILE, dtype=np.float16, mode="w+", shape=(n, v, c))
    mm[:] = np.random.default_rng(0).normal(size=(n, v, c))
    mm.flush()
    spec = ViewSpec(32, 4, True, (0.5,) * 3, (0.25,) * 3)
    index_map = np.array([3, 19, 0, 7])  # a subset's base indices
    indices, views = torch.tensor([1, 3, 0]), torch.tensor([5, 161, 0])
    mapped = TeacherFeed(TeacherCache(tmp_path), spec, 0, index_map, torch.device("cpu")).logits(indices, views, 1)
    on_device = TeacherFeed(TeacherCache(tmp_path).to_device(torch.device(device)), spec, 0, index_map,
                            torch.device(device)).logits(indices.to(device), views.to(device), 1)
    assert on_device.device.type == device and torch.equal(mapped, on_device.cpu())
    assert torch.equal(mapped[1], torch.from_numpy(mm[7, 161].astype(np.float32)))


def test_step_time_sets_up_every_registered_method(step_time, capsys):
    """With no --methods every registered method is built and set up as the trainer would (CRD
    sizes its memory bank from the training labels); one that cannot run in the bare loop is
    listed as not timed, never a crash."""
    from kdlab.methods import list_methods, method_class

    threads = torch.get_num_threads()
    try:
        step_time.main(["--teacher", "resnet8", "--student", "resnet8", "--batch", "4", "--classes", "10",
                        "--steps", "1", "--warmup", "0", "--rounds", "1", "--threads", "1",
                        "--dataset-size", "64"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for name in list_methods():
        if name != "vanilla" and "classification" in method_class(name).tasks:  # vanilla: the student step
            assert f"| {name} |" in out or f"| {name} (no teacher) |" in out or f"not timed: {name}" in out, name
    # The one method this loop cannot set up says why in a sentence, not with an AttributeError.
    assert "not timed: dkd_split: TrainingError: method dkd_split with method.split=global ranks" in out
