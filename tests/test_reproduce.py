"""`kdlab reproduce`: the result tables as data, every row's config, and the runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdlab.errors import KDLabError
from kdlab.reproduce.runner import Measured, metric_values, plan_rows, reproduce, split_overrides
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
