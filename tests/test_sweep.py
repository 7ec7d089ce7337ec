"""`kdlab sweep`: the sweep file, its plan (everything checked before anything trains), the
summary's numbers and figure, and one tiny digits sweep end to end (train, then reuse)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import ConfigError
from kdlab.experiments.results import mean_std
from kdlab.schema.experiment import check_run_name
from kdlab.sweep.config import format_value, key_titles, load_sweep
from kdlab.sweep.plan import plan_sweep
from kdlab.sweep.summary import PointRuns, heatmap_grid, markdown, plot, sweep_data

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
DIGITS = REPO / "configs" / "sweeps" / "digits_dkd_beta.yaml"
TINY = ["train.epochs=1", "data.train_subset=128", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false"]


def write_sweep(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(body.replace("DIGITS", str(REPO / "configs" / "digits")))
    return path


# ------------------------------------------------------------------------- the shipped sweeps
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_builds_its_plan_without_data(path, tmp_path):
    sweep = load_sweep(path)
    sp = plan_sweep(sweep, [f"output_dir={tmp_path}"])
    assert len(sp.runs) == len(sweep.points) * sweep.seeds
    assert {r.run_dir.parent for r in sp.runs} == {tmp_path / sweep.name}
    for run in sp.runs:
        check_run_name(run.name)
        assert run.action == "train" and run.jobs
    if sweep.teacher is not None:  # the students wait for the teacher (and its cache)
        assert sp.teacher_action == "train"
        assert all(sp.plan.jobs[0].name in _ancestors(sp.plan, r.jobs[0]) for r in sp.runs)
    if sweep.settings.teacher_cache:  # ... built once into the sweep's folder, after the teacher
        cache = next(j for j in sp.plan.jobs if j.kind == "cache")
        assert cache.run_dir == str(tmp_path / sweep.name / "teacher_cache") and cache.after == (sp.plan.jobs[0].name,)
        assert all(cache.name in _ancestors(sp.plan, r.jobs[0]) for r in sp.runs)
        assert {c.teacher.cache for r in sp.runs for c in r.configs} == {cache.run_dir}
    assert not list(tmp_path.iterdir())  # planning writes nothing


def _ancestors(plan, name):
    jobs = {j.name: j for j in plan.jobs}
    out, todo = set(), list(jobs[name].after)
    while todo:
        n = todo.pop()
        out.add(n)
        todo += jobs[n].after
    return out


def test_points_labels_and_overrides_reach_the_configs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, """
sweep:
  name: ab
  base: DIGITS/dkd.yaml
  teacher: DIGITS/teacher.yaml
  points: [{method.alpha: 1, method.beta: 8.0}, {method.alpha: 0.5, method.beta: 2}]
  seeds: 2
  overrides: [train.epochs=2, method.temperature=2]
"""))
    sp = plan_sweep(sweep, [f"output_dir={tmp_path / 'out'}", "train.seed=5"])
    assert [r.name for r in sp.runs] == ["alpha1_beta8_seed5", "alpha1_beta8_seed6", "alpha0.5_beta2_seed5",
                                         "alpha0.5_beta2_seed6"]
    cfg = sp.runs[2].configs[0]
    assert (cfg.method.alpha, cfg.method.beta, cfg.method.temperature, cfg.train.epochs) == (0.5, 2.0, 2.0, 2)
    teacher = sp.teacher_config  # shared overrides reach the teacher, method.* do not
    assert teacher.train.epochs == 2 and teacher.method.name == "vanilla" and teacher.train.seed == 5
    # digits/dkd.yaml names best.pt: the students load the teacher run's best.pt
    assert cfg.teacher.checkpoint == str(tmp_path / "out" / "digits_teacher_resnet20" / "best.pt")


def test_labels_are_short_and_fall_back_to_whole_keys():
    assert key_titles(["method.alpha", "method.beta"]) == {"method.alpha": "alpha", "method.beta": "beta"}
    assert key_titles(["method.temperature", "teacher.temperature"]) == {
        "method.temperature": "method-temperature", "teacher.temperature": "teacher-temperature"}
    assert [format_value(v) for v in (8.0, 0.5, 1e-4, 1e-5, True, None, "b")] == [
        "8", "0.5", "0.0001", "1e-5", "true", "null", "b"]


# --------------------------------------------------------------- refused before anything runs
@pytest.mark.parametrize("grid, named", [
    ("{method.betaa: [1.0]}", ["method.betaa", "did you mean 'method.beta'"]),
    ("{method.beta: [2.0, high]}", ["method.beta='high'", "point beta"]),
])
def test_a_bad_grid_key_or_value_is_one_error_and_nothing_is_written(tmp_path, capsys, grid, named):
    path = write_sweep(tmp_path, f"sweep: {{name: bad, base: DIGITS/dkd.yaml, teacher: DIGITS/teacher.yaml, "
                                 f"grid: {grid}}}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(path), f"output_dir={out}", *TINY]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and all(n in err for n in named), err
    assert not out.exists()


def test_a_bad_sweep_file_names_the_key(tmp_path, capsys):
    path = write_sweep(tmp_path, "sweep: {name: x, base: DIGITS/dkd.yaml, grid: {method.beta: [1]}, seed: 2}\n")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "unknown key 'sweep.seed'; did you mean 'sweep.seeds'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="either grid"):
        load_sweep(write_sweep(tmp_path, "sweep: {name: x, base: DIGITS/dkd.yaml}\n"))


def test_a_run_folder_of_another_config_is_refused_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "out"
    sp = plan_sweep(load_sweep(DIGITS), [f"output_dir={out}", *TINY])
    other = sp.runs[1].configs[0].model_copy(update={"train": sp.runs[1].configs[0].train.model_copy(
        update={"epochs": 7})})
    folder = RunFolder(sp.runs[1].run_dir)
    folder.path.mkdir(parents=True)
    folder.write_config(other)
    folder.write_result(RunResult(str(folder.path), 7, 7, last={"top1": 50.0}, best={"top1": 50.0}).to_json())
    assert main(["sweep", str(DIGITS), f"output_dir={out}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "beta1_seed1 already holds a run of another config" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["digits_dkd_beta"]  # no teacher trained
    assert sorted(p.name for p in (out / "digits_dkd_beta").iterdir()) == ["beta1_seed1"]


def test_a_missing_teacher_file_is_refused_with_the_fix(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, "sweep: {name: f, base: DIGITS/dkd.yaml, grid: {method.beta: [1.0]}}\n"))
    with pytest.raises(ConfigError, match="teacher.checkpoint .* does not exist.*sweep.teacher"):
        plan_sweep(sweep, [f"output_dir={tmp_path}", "teacher.checkpoint=/nonexistent/best.pt"])


def test_teacher_cache_is_refused_for_a_feature_method(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, """
sweep: {name: r, base: DIGITS/reviewkd.yaml, teacher: DIGITS/teacher.yaml, grid: {method.weight: [1.0]},
        teacher_cache: true}
"""))
    with pytest.raises(ConfigError, match="needs the teacher's features"):
        plan_sweep(sweep, [f"output_dir={tmp_path}"])


# ------------------------------------------------------------------------------ the summary
def _result(top1: float, top5: float) -> RunResult:
    return RunResult("x", 1, 1, last={"top1": top1, "top5": top5}, best={"top1": top1 + 1, "top5": top5})


def test_two_keys_give_a_heatmap_of_the_means(tmp_path):
    points = []
    for a in (0.5, 1.0):
        for b in (1.0, 8.0):
            values = {"method.alpha": a, "method.beta": b}
            results = [_result(10 * a + b, 90.0), _result(10 * a + b + 2, 92.0)]
            points.append(PointRuns(f"alpha{format_value(a)}_beta{format_value(b)}", values, ["r0", "r1"], results))
    points[-1].results.pop()
    points[-1].missing["alpha1_beta8_seed1"] = "failed"
    data = sweep_data("ab", "base.yaml", ["method.alpha", "method.beta"], points)
    assert data["metric"] == "top1"
    first = data["points"][0]
    assert first["n"] == 2 and first["last"]["top1"] == {"mean": 7.0, "std": pytest.approx(math.sqrt(2))}
    assert first["best"]["top1"]["mean"] == 8.0
    rows, cols, grid = heatmap_grid(data, data["points"], "top1")
    assert (rows, cols) == ([0.5, 1.0], [1.0, 8.0]) and grid == [[7.0, 14.0], [12.0, 18.0]]
    assert plot(data, tmp_path / "sweep.png").stat().st_size > 1000
    text = markdown(data)
    assert "| alpha0.5_beta1 | 0.5   | 1    | 2 | 7.00 ± 1.41  | 91.00 ± 1.41 | 8.00 ± 1.41" in text
    assert "alpha1_beta8_seed1: failed" in text and "1 point(s) incomplete" in text


def test_one_and_three_keys_plot(tmp_path):
    one = sweep_data("t", "b", ["method.kind"], [PointRuns(k, {"method.kind": k}, ["r"], [_result(v, 1.0)])
                                                 for k, v in (("tsd", 1.0), ("strict", 2.0))])
    assert plot(one, tmp_path / "one.png") is not None
    keys = ["a.x", "a.y", "a.z"]
    three = sweep_data("t", "b", keys, [PointRuns(f"p{i}", dict(zip(keys, (i % 2, i // 2 % 2, 1.0))), ["r"],
                                                  [_result(float(i), 1.0)]) for i in range(4)])
    assert plot(three, tmp_path / "three.png") is not None
    empty = sweep_data("t", "b", keys, [PointRuns("p", dict(zip(keys, (1, 1, 1))), missing={"p_seed0": "failed"})])
    assert plot(empty, tmp_path / "none.png") is None


# ------------------------------------------------------------------------------ end to end
def test_a_failed_run_is_marked_and_the_others_are_summarised(tmp_path, capsys):
    path = write_sweep(tmp_path, 'sweep: {name: f, base: DIGITS/student_alone.yaml, grid: {train.device: [cpu, "cuda:99"]}}\n')
    assert main(["sweep", str(path), f"output_dir={tmp_path / 'out'}", *TINY[:2], "data.train_subset=64",
                 *TINY[3:]]) == 1
    data = json.loads((tmp_path / "out" / "f" / "sweep.json").read_text())
    ok, failed = data["points"]
    assert (ok["label"], ok["n"], ok["missing"]) == ("devicecpu", 1, {})
    assert (failed["label"], failed["n"], failed["missing"]) == ("devicecuda-99", 0, {"devicecuda-99_seed0": "failed"})
    assert "devicecuda-99_seed0: failed" in capsys.readouterr().out



@pytest.mark.slow
def test_digits_sweep_end_to_end_then_reused(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sweep", str(DIGITS), f"output_dir={out}", *TINY, "--jobs", "2"]
    assert main(args) == 0
    root = out / "digits_dkd_beta"
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert (root / name).is_file()
    data = json.loads((root / "sweep.json").read_text())
    assert [p["label"] for p in data["points"]] == ["beta1", "beta8"] and data["metric"] == "top1"
    for p in data["points"]:
        assert p["n"] == 2 and not p["missing"]
        results = [RunResult.from_json(RunFolder(d).read_result()) for d in p["runs"]]
        for metric in ("top1", "top5"):
            mean, std = mean_std([r.last[metric] for r in results])
            assert p["last"][metric]["mean"] == pytest.approx(mean)
            assert p["last"][metric]["std"] == pytest.approx(std) and math.isfinite(p["last"][metric]["std"])
            assert p["best"][metric]["mean"] == pytest.approx(mean_std([r.best[metric] for r in results])[0])
    assert "± " in (root / "sweep.md").read_text()
    checkpoints = sorted(out.rglob("*.pt"))
    assert len(checkpoints) == 10  # teacher + 4 students, last.pt and best.pt each
    stamps = {p: p.stat().st_mtime_ns for p in checkpoints}
    capsys.readouterr()

    assert main(args) == 0  # again: nothing trains
    printed = capsys.readouterr().out
    assert printed.count("| reused ") == 4 and "4 reused" in printed and "teacher: reuse" in printed
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.pt"))} == stamps

    (root / "sweep.md").unlink()
    assert main(["sweep", str(DIGITS), f"output_dir={out}", *TINY, "--report"]) == 0
    assert "beta8" in (root / "sweep.md").read_text()
