"""benchmarks/sweep_throughput.py runs `kdlab train --seeds R --jobs J` for each J, and its table
is computed from its own timings.

Speed itself is never asserted (the suite shares its cores); only that every mode trained
its R runs and that the table agrees with the raw seconds it recorded.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_throughput.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("kdlab_sweep_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.slow
def test_each_mode_trains_every_run_and_the_table_follows_from_its_seconds(sweep, tmp_path, capsys):
    raw = tmp_path / "sweep.json"
    assert sweep.main(["--runs", "2", "--epochs", "1", "--train-subset", "64", "--jobs-list", "1,2",
                       "--policy", "passive", "--json", str(raw)]) == 0
    out = capsys.readouterr().out
    data = json.loads(raw.read_text())
    assert data["policy"] == "passive" and "OMP_WAIT_POLICY=PASSIVE" in out
    assert set(data["rounds"]) == {"1", "2"}
    for rounds in data["rounds"].values():
        assert len(rounds) == 1 and len(rounds[0]["run_seconds"]) == 2  # both seeds finished in every mode
        assert all(s > 0 for s in rounds[0]["run_seconds"]) and rounds[0]["wall"] > max(rounds[0]["run_seconds"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| --jobs")}
    assert set(rows) == {"1", "2"}
    wall = {j: data["rounds"][str(j)][0]["wall"] for j in (1, 2)}
    for j in (1, 2):
        threads, wall_s, per_hour, speedup, _ = rows[str(j)]
        assert int(threads) == max(1, data["cores"] // j)
        assert float(wall_s) == pytest.approx(wall[j], abs=0.05)
        assert float(per_hour) == pytest.approx(2 * 3600 / wall[j], abs=1)
        assert float(speedup) == pytest.approx(wall[1] / wall[j], abs=0.005)
    assert rows["1"][3] == "1.00"
    assert f"{data['cores']} cores (affinity)" in out and "1-min load average" in out


def test_modes_alternate_their_order_round_by_round(sweep):
    assert [sweep.order_of_round([1, 2, 4], r) for r in range(3)] == [[1, 2, 4], [4, 2, 1], [1, 2, 4]]


def test_policy_sets_omp_wait_policy_only_when_asked(sweep, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert sweep.mode_env("passive")["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in sweep.mode_env(None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert sweep.mode_env(None)["OMP_WAIT_POLICY"] == "ACTIVE"  # the environment is left as it is


@pytest.mark.parametrize("jobs", ["1,x", "0,2", "2,2", ""])
def test_a_bad_jobs_list_is_one_clear_error(sweep, jobs, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--jobs-list", jobs])
    assert "--jobs-list" in capsys.readouterr().err
