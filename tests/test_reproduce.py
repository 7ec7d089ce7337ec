"""`kdlab reproduce`: the result tables as data, every row's config, and the runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdlab.errors import KDLabError
from kdlab.reproduce.runner import Measured, build_plan, metric_values, plan_rows, reproduce, split_overrides
from kdlab.reproduce.table import METRICS, Row, load_rows, select_rows

REPO = Path(__file__).resolve().parents[1]
ROWS = load_rows()

DKD_CIFAR = {  # PAPERS.md, DKD table: pair -> (KD, DKD)
    "resnet56_resnet20": (70.66, 71.97), "resnet110_resnet32": (73.08, 74.11),
    "resnet32x4_resnet8x4": (73.33, 76.32), "wrn_40_2_wrn_16_2": (74.92, 76.23),
    "wrn_40_2_wrn_40_1": (73.54, 74.81), "vgg13_vgg8": (72.98, 74.68),
    "resnet32x4_ShuffleV1": (74.07, 76.45), "resnet32x4_ShuffleV2": (74.45, 77.07),
    "wrn_40_2_ShuffleV1": (74.83, 76.70), "vgg13_MobileNetV2": (67.37, 69.71),
    "ResNet50_MobileNetV2": (67.35, 70.35),
}


def test_table_has_the_papers_rows():
    by_id = {r.id: r for r in ROWS}
    assert len(by_id) == len(ROWS)
    for pair, (kd, dkd) in DKD_CIFAR.items():
        assert by_id[f"kd/cifar100/{pair}"].published == kd
        assert by_id[f"dkd/cifar100/{pair}"].published == dkd
        assert f"reviewkd/cifar100/{pair}" in by_id
    assert by_id["dkd/imagenet/resnet34_resnet18"].published == 71.70
    assert by_id["kd/imagenet/resnet50_MobileNetV1"].published == 70.50
    assert by_id["reviewkd/imagenet/resnet50_MobileNetV1"].published == 72.56
    assert by_id["teacher/cifar100/resnet32x4"].published == 79.42
    assert by_id["student/cifar100/MobileNetV2"].published == 64.60
    assert by_id["autoaugment/cifar100/teacher_resnet32x4"].published == 81.29
    assert by_id["dkd_table1/cifar100/resnet32x4_resnet8x4/tckd"].published == -3.87
    for r in ROWS:
        assert r.paper and r.table and r.dataset and r.metric in METRICS
        if r.metric == "top1_gain":
            assert r.baseline in by_id, r.id


def test_every_row_config_exists_and_validates():
    from kdlab.config import load_config
    from kdlab.generations.config import is_chain_file, load_chain

    missing, checked = [], 0
    for r in ROWS:
        for rel in filter(None, (r.config, r.teacher_config)):
            path = REPO / rel
            if not path.is_file():
                missing.append(f"{r.id}: {rel}")
                continue
            load_chain(path) if is_chain_file(path) else load_config(path)
            checked += 1
    assert not missing, "rows name configs that do not exist:\n" + "\n".join(missing)
    assert checked > 80
    # Only rows kdlab has no config for may leave it empty, and they say so when run.
    # a number the paper does not give, and FSP's "n/a" cell of the CRD table (FSP needs equal channels)
    assert {r.id for r in ROWS if not r.config} == {
        f"tolerant/imagenet/resnet18_D0.6_0.6/start_{k}" for k in ("top1", "top5")} | {"fsp/cifar100/wrn_40_2_wrn_40_1"}


def test_list_shows_every_row(capsys):
    from kdlab.cli import main

    assert main(["reproduce", "--list", "--root", str(REPO)]) == 0
    out = capsys.readouterr().out
    for r in ROWS:
        assert r.id in out
    assert "(missing)" not in out
    assert main(["reproduce", "--list", "dkd/cifar100/*", "--root", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert out.count("dkd/cifar100/") == 11 and "kd/cifar100/resnet56" not in out.replace("dkd/cifar100/", "")


def test_select_rows_globs_and_typos():
    from kdlab.errors import ConfigError

    assert [r.id for r in select_rows(["split/cifar100/resnet32x4_resnet8x4/*"])] == [
        "split/cifar100/resnet32x4_resnet8x4/top", "split/cifar100/resnet32x4_resnet8x4/bottom"]
    with pytest.raises(ConfigError, match="did you mean 'dkd/cifar100/resnet32x4_resnet8x4'"):
        select_rows(["dkd/cifar100/resnet32x4_resnet8x"])
    assert split_overrides(["data.root=/d", "method.beta=2", "teacher.checkpoint=x", "train.epochs=1", "name=n"]) == (
        ["data.root=/d", "train.epochs=1"], ["method.beta=2", "teacher.checkpoint=x", "name=n"])


def test_missing_dataset_is_refused_before_training(tmp_path, capsys):
    from kdlab.cli import main

    out_dir = tmp_path / "runs"
    rc = main(["reproduce", "dkd/cifar100/resnet32x4_resnet8x4", "noisy/cifar100/10/kd_resnet32x4_resnet8x4",
               f"data.root={tmp_path / 'no_cifar'}", f"output_dir={out_dir}", "--root", str(REPO)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("cannot run: dataset 'cifar100' is not available") == 2
    assert "set data.root" in err
    assert not out_dir.exists()  # nothing trained, no teacher either


def test_metric_values():
    m = Measured(last={"top1": 70.0, "top5": 90.0}, best={"top1": 71.0, "top5": 91.0}, n=1)
    base = Measured(last={"top1": 72.0, "top5": 0.0}, best={"top1": 72.5, "top5": 0.0}, n=1)
    row = Row("x", "p", "t", "d", "m", None, None)
    assert metric_values(row, m) == (70.0, 71.0)
    assert metric_values(Row("x", "p", "t", "d", "m", None, None, metric="top1_error"), m) == (30.0, 29.0)
    assert metric_values(Row("x", "p", "t", "d", "m", None, None, metric="top5_error_best_generation"), m) == (10.0, 9.0)
    assert metric_values(Row("x", "p", "t", "d", "m", None, None, metric="top1_gain"), m, base) == (-2.0, -1.5)
    det = Measured(last={"bbox_ap": 30.5, "segm_ap": 27.25}, best={"bbox_ap": 31.0, "segm_ap": 28.0}, n=1)
    assert metric_values(Row("x", "p", "t", "d", "m", None, None, metric="bbox_ap"), det) == (30.5, 31.0)
    assert metric_values(Row("x", "p", "t", "d", "m", None, None, metric="segm_ap"), det) == (27.25, 28.0)
    with pytest.raises(KDLabError, match="needs 'segm_ap', which its runs do not report"):
        metric_values(Row("x", "p", "t", "d", "m", None, None, metric="segm_ap"), m)


def test_reproduce_trains_teacher_then_rows(make_config, tmp_path):
    """A tiny table on digits: the teacher is trained once (first), then reused; a gain row
    pulls in its baseline row; a finished run is reused on the second call."""
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    sub = {"train_subset": 64}
    (cfg_dir / "teacher.yaml").write_text(yaml.safe_dump(make_config(name="t", data=sub)))
    (cfg_dir / "alone.yaml").write_text(yaml.safe_dump(make_config(name="alone", data=sub)))
    (cfg_dir / "kd.yaml").write_text(yaml.safe_dump(make_config(
        name="kd", data=sub, teacher={"name": "resnet8", "checkpoint": "placeholder.pt"}, method={"name": "kd"})))
    rows = [
        Row("demo/alone", "p", "t", "digits", "vanilla", "configs/alone.yaml", 50.0),
        Row("demo/kd", "p", "t", "digits", "kd", "configs/kd.yaml", 1.0, metric="top1_gain",
            teacher_config="configs/teacher.yaml", baseline="demo/alone"),
    ]
    plans = plan_rows([rows[1]], [], root=tmp_path, all_rows=rows)
    assert [p.row.id for p in plans] == ["demo/alone", "demo/kd"] and plans[0].is_dependency
    assert plans[1].teacher_action == "train" and plans[1].problem is None
    outcomes = reproduce(plans)
    assert [o.status for o in outcomes] == ["measured", "measured"]
    runs = tmp_path / "runs"
    assert (runs / "t" / "best.pt").is_file()
    kd_cfg = yaml.safe_load((runs / "kd" / "config.yaml").read_text())
    assert kd_cfg["teacher"]["checkpoint"] == str(runs / "t" / "best.pt")
    res = {n: json.loads((runs / n / "result.json").read_text()) for n in ("alone", "kd")}
    assert outcomes[1].last == pytest.approx(res["kd"]["last"]["top1"] - res["alone"]["last"]["top1"])
    assert outcomes[1].diffs()[0] == pytest.approx(outcomes[1].last - 1.0)
    # Second time: with --resume everything is reused (without it, refused: tests/test_run_folder.py),
    # and a changed config is refused rather than reused.
    again = plan_rows([rows[1]], [], root=tmp_path, all_rows=rows, resume=True)
    assert again[1].teacher_action == "reuse" and again[1].status == "done (reused)"
    changed = plan_rows([rows[1]], ["method.temperature=2"], root=tmp_path, all_rows=rows, resume=True)
    assert "already holds a run of another config" in changed[1].problem


# ------------------------------------------------------------------ one plan for all the rows
def _serve(monkeypatch, tmp_path, configs: dict[str, dict], rows: list[Row]) -> list[str]:
    """Write `configs` (file stem -> raw config) to tmp_path/configs and serve `rows` to
    `kdlab reproduce` in place of the papers' table; return the command's start."""
    from kdlab.reproduce import table

    (tmp_path / "configs").mkdir()
    for stem, raw in configs.items():
        (tmp_path / "configs" / f"{stem}.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(table, "load_rows", lambda: rows)
    return ["reproduce", "demo/*", "--root", str(tmp_path), "--json", str(tmp_path / "out.json")]


def _statuses(tmp_path) -> dict[str, dict]:
    return {o["id"]: o for o in json.loads((tmp_path / "out.json").read_text())}


def _files(folder: Path) -> dict[str, int]:
    """Every file a run wrote, with its modification time (the executor's logs aside)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "logs" not in p.relative_to(folder).parts}


def _kd(make_config, name: str, **method) -> dict:
    return make_config(name=name, data={"train_subset": 64}, method={"name": "kd", **method},
                       teacher={"name": "resnet8", "checkpoint": "placeholder.pt"})


def test_rows_sharing_a_teacher_train_it_once_in_parallel_and_resume_trains_nothing(
        make_config, tmp_path, monkeypatch, capsys):
    from kdlab.cli import main

    rows = [Row(f"demo/{n}", "p", "t", "digits", "kd", f"configs/{n}.yaml", 50.0, teacher_config="configs/teacher.yaml")
            for n in ("kd", "kd_t2")]
    command = _serve(monkeypatch, tmp_path, {"teacher": make_config(name="t", data={"train_subset": 64}),
                                             "kd": _kd(make_config, "kd"),
                                             "kd_t2": _kd(make_config, "kd_t2", temperature=2.0)}, rows)
    runs = tmp_path / "runs"
    plan = build_plan(plan_rows(rows, [], root=tmp_path, all_rows=rows))
    assert [j.name for j in plan.jobs] == [str(runs / n) for n in ("t", "kd", "kd_t2")]  # one teacher job
    assert [j.after for j in plan.jobs] == [(), (str(runs / "t"),), (str(runs / "t"),)]
    assert plan.log_dir == runs / "logs"

    assert main([*command, "--jobs", "2"]) == 0
    assert "reproduce: 3 done" in capsys.readouterr().out  # the executor's table: the teacher trained once
    assert {k: o["status"] for k, o in _statuses(tmp_path).items()} == {"demo/kd": "measured", "demo/kd_t2": "measured"}
    for n in ("kd", "kd_t2"):
        teacher = yaml.safe_load((runs / n / "config.yaml").read_text())["teacher"]
        assert teacher["checkpoint"] == str(runs / "t/best.pt")
    assert sorted(p.name for p in (runs / "logs").iterdir()) == ["kd.log", "kd_t2.log", "t.log"]
    first = _files(runs)
    assert main([*command, "--jobs", "2", "--resume"]) == 0
    assert "reproduce: 2 reused" in capsys.readouterr().out  # the finished teacher is no job at all
    assert _files(runs) == first  # nothing trained again, nothing rewritten
    assert {o["status"] for o in _statuses(tmp_path).values()} == {"measured"}


def test_a_failing_run_fails_its_rows_only(make_config, tmp_path, monkeypatch, capsys):
    """The teacher of demo/kd cannot load its own teacher (a file that is no checkpoint): it
    fails, demo/kd (waiting for it) is skipped and 'failed', demo/alone is measured."""
    from kdlab.cli import main

    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    broken_teacher = _kd(make_config, "bt")
    broken_teacher["teacher"]["checkpoint"] = str(tmp_path / "garbage.pt")
    rows = [Row("demo/alone", "p", "t", "digits", "vanilla", "configs/alone.yaml", 50.0),
            Row("demo/kd", "p", "t", "digits", "kd", "configs/kd.yaml", 50.0, teacher_config="configs/bt.yaml")]
    command = _serve(monkeypatch, tmp_path, {"alone": make_config(name="alone", data={"train_subset": 64}),
                                             "bt": broken_teacher, "kd": _kd(make_config, "kd")}, rows)
    assert main(command) == 1
    out, err = capsys.readouterr()
    outcomes = _statuses(tmp_path)
    assert outcomes["demo/alone"]["status"] == "measured" and outcomes["demo/alone"]["measured_last"] is not None
    assert outcomes["demo/kd"]["status"] == "failed" and outcomes["demo/kd"]["problem"].startswith("bt failed: ")
    assert "demo/kd: failed: bt failed: " in err
    assert all(f"1 {s}" in out for s in ("failed", "skipped", "done"))  # the executor's table
    runs = tmp_path / "runs"
    assert (runs / "alone/result.json").is_file() and not (runs / "kd").exists()


def test_a_chain_row_runs_its_generations_as_jobs(make_config, tmp_path, monkeypatch, capsys):
    """A *_best_generation row: its chain's generations are jobs of the plan (gen1 after gen0),
    its root is claimed before and released after, and the best generation is measured."""
    from kdlab.cli import main
    from kdlab.generations import runner as chains
    from kdlab.plan import Job

    # Until kdlab.generations.runner has prepare_chain/finish_chain, stand-ins with their signatures.
    def stand_in_prepare(chain, *, resume=False, overwrite=False, after=()):
        jobs, prev = [], tuple(after)
        for m, cfg in enumerate(chain.configs):
            jobs.append(Job.train(cfg, run_dir=chain.run_dir(m), after=prev))
            prev = (jobs[-1].name,)
        return jobs

    prepare = getattr(chains, "prepare_chain", stand_in_prepare)
    finish = getattr(chains, "finish_chain", lambda chain, *, report=True: None)
    calls: list[str] = []
    monkeypatch.setattr(chains, "prepare_chain", lambda c, **kw: calls.append("prepare") or prepare(c, **kw),
                        raising=False)
    monkeypatch.setattr(chains, "finish_chain", lambda c, **kw: calls.append("finish") or finish(c, **kw),
                        raising=False)
    chain = {"experiment": make_config(name="chain", data={"train_subset": 64}),
             "chain": {"notation": "D(0.6, 0.6)", "generations": 1, "seed_offset": 0}}
    rows = [Row("demo/chain", "p", "t", "digits", "tolerant", "configs/chain.yaml", 50.0,
                metric="top1_best_generation")]
    command = _serve(monkeypatch, tmp_path, {"chain": chain}, rows)
    assert main(command) == 0
    assert calls == ["prepare", "finish"]
    assert "reproduce: 2 done" in capsys.readouterr().out
    root = tmp_path / "runs/chain"
    tops = [json.loads((root / f"gen{m}/result.json").read_text())["last"]["top1"] for m in (0, 1)]
    outcome = _statuses(tmp_path)["demo/chain"]
    assert outcome["status"] == "measured" and outcome["measured_last"] == pytest.approx(max(tops))


def test_rows_training_one_folder_with_different_configs_are_refused(make_config, tmp_path):
    """Two rows whose configs train into one run folder: the same config is one shared job, a
    different one makes the later row 'cannot run' before anything trains."""
    (tmp_path / "configs").mkdir()
    for stem, lr in (("a", 0.05), ("same_as_a", 0.05), ("b", 0.1)):
        (tmp_path / "configs" / f"{stem}.yaml").write_text(yaml.safe_dump(make_config(name="one", optim={"lr": lr})))
    rows = [Row(f"demo/{s}", "p", "t", "digits", "vanilla", f"configs/{s}.yaml", 50.0) for s in ("a", "same_as_a", "b")]
    plans = plan_rows(rows, [], root=tmp_path, all_rows=rows)
    assert [p.problem for p in plans[:2]] == [None, None]
    assert "is also the run folder of row demo/a, with another config" in plans[2].problem
    assert [j.name for j in build_plan(plans).jobs] == [str(tmp_path / "runs/one")]
