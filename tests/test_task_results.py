"""Results as dicts of the task's metrics: result.json (current and older layouts), the
`kdlab results` table, and `kdlab reproduce` scoring a detection row end to end."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from detkit import tiny_config, tiny_shapes  # noqa: E402

from kdlab.engine.result import RunResult  # noqa: E402
from kdlab.experiments.results import find_runs, format_csv, format_text, group_runs  # noqa: E402
from kdlab.reproduce.runner import plan_rows, reproduce  # noqa: E402
from kdlab.reproduce.table import Row  # noqa: E402


def test_result_json_round_trips_and_undefined_metrics_are_null():
    res = RunResult(run_dir="r", epochs=3, best_epoch=2, primary_metric="bbox_ap", headline=("bbox_ap", "segm_ap"),
                    last={"bbox_ap": 31.5, "bbox_aps": math.nan}, best={"bbox_ap": 32.0, "bbox_aps": math.nan})
    text = json.dumps(res.to_json(), allow_nan=False)  # valid JSON: no NaN
    data = json.loads(text)
    assert data["last"] == {"bbox_ap": 31.5, "bbox_aps": None}
    back = RunResult.from_json(data)
    assert back.last["bbox_ap"] == 31.5 and math.isnan(back.last["bbox_aps"])
    assert back.headline == ("bbox_ap", "segm_ap") and back.primary_metric == "bbox_ap" and back.best_epoch == 2
    assert back.summary() == "last bbox_ap 31.50  best bbox_ap 32.00 (epoch 2)"


def test_older_flat_result_json_still_reads():
    old = {"run_dir": "r", "epochs": 240, "last_top1": 73.1, "last_top5": 91.0, "best_top1": 73.5,
           "best_top5": 91.2, "best_epoch": 200, "skipped_batches": 0}
    res = RunResult.from_json(old)
    assert res.last == {"top1": 73.1, "top5": 91.0} and res.best == {"top1": 73.5, "top5": 91.2}
    assert res.headline == ("top1", "top5") and res.primary_metric == "top1"
    assert res.flat_metrics() == {"last_top1": 73.1, "best_top1": 73.5, "last_top5": 91.0, "best_top5": 91.2}


def _write_run(folder: Path, result: dict, cfg: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_results_table_shows_each_task_its_own_headline_metrics(tmp_path):
    cfg = {"model": {"name": "resnet8"}, "method": {"name": "kd"}, "data": {"name": "cifar100"}}
    _write_run(tmp_path / "old_seed0", {"epochs": 2, "best_epoch": 1, "last_top1": 70.0, "last_top5": 90.0,
                                        "best_top1": 71.0, "best_top5": 91.0}, {**cfg, "name": "old_seed0"})
    new = RunResult("x", 2, 2, "top1", ("top1", "top5"), {"top1": 72.0, "top5": 92.0}, {"top1": 72.0, "top5": 92.0})
    _write_run(tmp_path / "old_seed1", new.to_json(), {**cfg, "name": "old_seed1"})
    det = RunResult("d", 1, 1, "bbox_ap", ("bbox_ap", "bbox_ap50", "segm_ap"),
                    {"bbox_ap": 30.0, "bbox_ap50": 50.0, "bbox_aps": math.nan, "segm_ap": math.nan},
                    {"bbox_ap": 30.0, "bbox_ap50": 50.0, "bbox_aps": math.nan, "segm_ap": math.nan})
    _write_run(tmp_path / "det", det.to_json(), {**cfg, "name": "det", "task": "detection"})
    groups = group_runs(find_runs(tmp_path), tmp_path)
    old = next(g for g in groups if g.group == "old")
    assert old.n == 2 and old.stats["last_top1"] == pytest.approx((71.0, math.sqrt(2.0)))
    header = format_text(groups).splitlines()[0]
    # Headline columns of both tasks; segm_ap (NaN: a box-only detector) and bbox_aps are not in the text table.
    for title in ("last top1", "best top5", "last bbox_ap", "best bbox_ap50"):
        assert title in header
    assert "segm_ap" not in header and "bbox_aps" not in header
    csv_header = format_csv(groups).splitlines()[0]
    assert "last_bbox_ap_mean" in csv_header and "segm_ap" not in csv_header


@pytest.mark.slow
def test_reproduce_scores_a_detection_row_end_to_end(tmp_path):
    """One COCO-style row (mask AP of a tiny Mask R-CNN on generated shapes) trained and scored."""
    shapes = tiny_shapes(tmp_path / "shapes")
    cfg = tiny_config(tmp_path / "runs", shapes, name="mask")
    cfg["model"]["name"] = "det:maskrcnn_mobilenet_v2_fpn"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mask.yaml").write_text(yaml.safe_dump(cfg))
    row = Row("det/shapes/mask", "p", "t", "shapes", "det_vanilla", "configs/mask.yaml", 10.0, metric="segm_ap")
    start = time.perf_counter()
    outcomes = reproduce(plan_rows([row], [], root=tmp_path, all_rows=[row]))
    assert outcomes[0].status == "measured", outcomes[0].problem
    saved = RunResult.from_json(json.loads((tmp_path / "runs" / "mask" / "result.json").read_text()))
    value = saved.last["segm_ap"]
    assert math.isfinite(value) and 0.0 <= value <= 100.0 and outcomes[0].last == value
    assert "bbox_ap" in saved.last and saved.primary_metric == "bbox_ap"
    json.dumps(outcomes[0].to_json(), allow_nan=False)
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """A one-epoch tiny Mask R-CNN run on generated shapes."""
    from kdlab.config import validate_config
    from kdlab.engine.trainer import Trainer

    tmp = tmp_path_factory.mktemp("mask")
    cfg = tiny_config(tmp / "runs", tiny_shapes(tmp / "shapes"), name="mask")
    cfg["model"]["name"] = "det:maskrcnn_mobilenet_v2_fpn"
    return Path(Trainer(validate_config(cfg)).fit().run_dir)


@pytest.mark.slow
def test_the_tools_around_a_detection_run_follow_its_task(mask_run, tmp_path, capsys):
    from kdlab.analysis.curves import plot_curves
    from kdlab.cli import main

    assert main(["eval", str(mask_run), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in kdlab eval's JSON"))
    assert {"bbox_ap", "segm_ap", "undefined"} <= set(report)
    assert all(report[k] is None for k in report["undefined"])
    assert plot_curves([mask_run], tmp_path / "c.png")["panels"][:2] == ["bbox_ap", "segm_ap"]
    ckpt = str(mask_run / "last.pt")
    assert main(["analyze", "--teacher", ckpt, "--student", ckpt, "--out", str(tmp_path / "r")]) != 0
    assert "kdlab analyze compares classifiers" in capsys.readouterr().err


def test_tasks_are_a_registry_a_plugin_task_trains_and_reports_its_own_metrics(make_config):
    from kdlab.config import validate_config
    from kdlab.engine.tasks import ClassificationTask, register_task, task_class
    from kdlab.engine.trainer import Trainer
    from kdlab.errors import ConfigError
    from kdlab.schema.tasks import TASKS

    class Top5First(ClassificationTask):
        """Classification judged by top-5: the task, not the trainer, decides what a result is."""

        primary_metric = "top5"
        headline_metrics = ("top5",)

    with pytest.raises(ConfigError, match="unknown task 'top5_first'. Valid names: classification, detection.*"
                       "registers with register_task"):
        validate_config(make_config(task="top5_first"))
    with TASKS.registered("top5_first", Top5First):
        result = Trainer(validate_config(make_config(name="t5", task="top5_first"))).fit()
        assert task_class("top5_first") is Top5First and task_class("detection").__name__ == "DetectionTask"
    assert result.primary_metric == "top5" and result.headline == ("top5",) and "top5" in result.best
    assert result.summary().startswith("last top5 ")
    with pytest.raises(ConfigError, match="register_task"):
        task_class("top5_first")  # gone again
    with pytest.raises(TypeError, match="subclass of kdlab.engine.tasks.Task"):
        register_task("nope")(object)


def test_a_dataset_serves_one_task_and_detection_datasets_build_their_files(make_config, tmp_path):
    from kdlab.config import validate_config
    from kdlab.data import DATASETS, build_datasets
    from kdlab.data.datasets import dataset_task
    from kdlab.engine.tasks import task_for
    from kdlab.errors import ConfigError, DataError
    from kdlab.schema.detection import DetectionConfig
    from kdlab.schema.experiment import DataConfig

    assert dataset_task("shapes") == dataset_task("coco") == "detection" and dataset_task("digits") == "classification"
    with pytest.raises(ConfigError, match="'shapes' is a detection dataset.*set task: detection"):
        validate_config(make_config(data={"name": "shapes"}))
    digits_detection = validate_config(make_config(task="detection"))  # caught by the task, building the data
    with pytest.raises(ConfigError, match="task: detection reads COCO-format data: set data.name to one of coco, shapes"):
        task_for(digits_detection).check_data(digits_detection)
    with pytest.raises(DataError, match="is a detection dataset; set task: detection.*digits"):
        build_datasets(DataConfig(name="shapes"))
    # The detection entries are real builders: where the data is (the shapes set generated there).
    det = DetectionConfig(shapes={"num_train": 2, "num_val": 1, "height": 32, "width": 32, "min_object": 8,
                                  "max_object": 12, "max_objects": 1})
    files = DATASETS.get("shapes")(DataConfig(name="shapes", root=str(tmp_path / "s")), det, str(tmp_path))
    assert files.train_annotations.is_file() and files.val_images.is_dir()
    coco = DATASETS.get("coco")(DataConfig(name="coco", root=str(tmp_path / "c")), det, str(tmp_path))
    assert coco.val_annotations == tmp_path / "c" / det.val_annotations
    with pytest.raises(DataError, match="data.root is not set for dataset 'coco'"):
        DATASETS.get("coco")(DataConfig(name="coco"), det, str(tmp_path))
