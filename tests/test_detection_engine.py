"""Detection through the engine (issue 13), the slow end-to-end checks: a run interrupted
mid-epoch resumes to exactly the uninterrupted run's weights, and two DDP processes (torchrun,
gloo) train and gather their detections into the COCO AP that one process computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.config import validate_config
from kdlab.engine.callbacks import Callback
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.trainer import Trainer

from detkit import tiny_config, tiny_shapes

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes") / "set")


class StopAt(Callback):
    """Ctrl-C after `step` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step, self.done = step, 0

    def on_step_end(self, trainer, batch_number, result) -> None:
        self.done += 1
        if self.done == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_detection_run_resumes_exactly(tmp_path, shapes_root):
    teacher = validate_config(tiny_config(tmp_path, shapes_root, name="teacher",
                                          model={"name": "det:fasterrcnn_resnet18_fpn"}))
    Trainer(teacher).fit()
    raw = tiny_config(tmp_path, shapes_root, method={"name": "det_reviewkd_dkd"},
                      teacher={"name": "det:fasterrcnn_resnet18_fpn", "checkpoint": str(tmp_path / "teacher/best.pt")},
                      schedule={"name": "multistep", "unit": "iteration", "milestones": [5], "warmup_iterations": 2},
                      train={"iterations": 7, "eval_every": 10})
    straight = Trainer(validate_config({**raw, "name": "straight"})).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(validate_config({**raw, "name": "cut"}), callbacks=[StopAt(5)]).fit()  # mid-epoch 2
    resumed = Trainer(validate_config({**raw, "name": "cut"}), resume=True).fit()
    a = Checkpoint.load(Path(straight.run_dir) / "last.pt")
    b = Checkpoint.load(Path(resumed.run_dir) / "last.pt")
    for key, value in a.model_state.items():
        assert torch.equal(value, b.model_state[key]), key
    for key, value in a.extra_state.items():  # ReviewKD's fusion modules too
        assert torch.equal(value, b.extra_state[key]), key
    assert resumed.last == straight.last


def test_torchrun_two_cpu_processes_train_and_gather_coco_ap(tmp_path, shapes_root):
    cfg = tiny_config(tmp_path / "runs", shapes_root, name="ddp", method={"name": "det_reviewkd"},
                      model={"name": "det:fasterrcnn_mobilenet_v2_fpn"},
                      teacher={"name": "det:fasterrcnn_mobilenet_v2_fpn"},
                      data={"batch_size": 4, "eval_batch_size": 2}, train={"epochs": 1})
    from kdlab.engine.tasks.detection import DetectionTask
    from kdlab.models.detection import build_detector

    # A teacher checkpoint (untrained: only the mechanics are checked here).
    from detkit import model_kwargs

    torch.manual_seed(0)
    kwargs = model_kwargs("fasterrcnn")
    t = build_detector("fasterrcnn_mobilenet_v2_fpn", 5, **kwargs)
    Checkpoint.for_model(t, "det:fasterrcnn_mobilenet_v2_fpn", 5, kwargs).save(tmp_path / "teacher.pt")
    cfg["teacher"]["checkpoint"] = str(tmp_path / "teacher.pt")
    # JSON is YAML: the real command line, which must know the det: prefix and the shapes dataset
    # without any import made for it.
    (tmp_path / "ddp.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "kdlab", "train", str(tmp_path / "ddp.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # One process scoring the saved student on the whole validation set gets the same AP:
    # the two ranks' detections were gathered before COCOeval.
    config = validate_config(cfg)
    task = DetectionTask()
    data = task.build_data(config)
    ckpt = Checkpoint.load(run / "last.pt")
    student = build_detector("fasterrcnn_mobilenet_v2_fpn", 5, **ckpt.model.kwargs, min_size=64, max_size=96,
                             skip_train_resize=True)
    student.load_state_dict(ckpt.model_state)
    from kdlab.engine.distributed import DistInfo

    # One image per batch here and on each rank (eval_batch_size 2 over 2 ranks): a detector's
    # output depends on the padding a batch adds, so only equal batches give equal detections.
    loader = task.eval_loader(data, config, batch_size=1, device=torch.device("cpu"), dist=DistInfo())
    metrics = task.evaluate(student, loader, data, config, torch.device("cpu"))
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75"):
        assert row[f"val/{key}"] == pytest.approx(metrics[key], abs=1e-6), key


def _gather_worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from kdlab.data.coco import CocoSplit
    from kdlab.engine.tasks.detection import gathered_coco_metrics

    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    try:
        val = CocoSplit(f"{folder}/img", f"{folder}/gt.json", train=False)
        # Each rank found exactly the objects of its own image, and nothing else.
        mine = [{"image_id": rank + 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
        metrics = gathered_coco_metrics(val, mine, ("bbox",))
        Path(f"{folder}/rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_detections_of_all_ranks_are_scored_together(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    images = [{"id": k, "file_name": f"{k}.png", "height": 50, "width": 50} for k in (1, 2)]
    for im in images:
        Image.new("RGB", (50, 50)).save(tmp_path / "img" / im["file_name"])
    anns = [{"id": k, "image_id": k, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0}
            for k in (1, 2)]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                  "categories": [{"id": 1, "name": "a"}]}))
    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Together the two ranks found both objects (AP 100); either alone would score 50.5.
        assert metrics["bbox_ap"] == pytest.approx(100.0)


def test_detection_demo_prints_an_ap_table_and_draws_the_boxes(tmp_path, capsys):
    import argparse

    from kdlab.commands._demo_detection import STEPS, run

    assert run(argparse.Namespace(output_dir=str(tmp_path / "demo"), figure=None, scale=0.01, device="cpu")) == 0
    out = capsys.readouterr().out
    for label, *_ in STEPS:
        assert label in out
    assert "box AP last" in out and "det_reviewkd_dkd" in out
    figure = tmp_path / "demo" / "demo_detection.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Running it again replaces the earlier demo's runs (its marker file) instead of refusing.
    assert run(argparse.Namespace(output_dir=str(tmp_path / "demo"), figure=str(tmp_path / "again.png"),
                                  scale=0.01, device="cpu")) == 0
    assert (tmp_path / "again.png").is_file()


def test_detection_demo_plan_students_wait_for_the_teacher(tmp_path):
    from kdlab.commands._demo_detection import TEACHER_NAME, demo_configs, detection_plan
    from kdlab.config import load_config

    cfgs = [load_config(data=raw) for raw in demo_configs(str(tmp_path), scale=0.01, device="cpu", progress=False)]
    plan = detection_plan(cfgs, overwrite=False, log_dir=tmp_path / "logs")
    plan.check()
    after = {Path(j.run_dir).name: [Path(a).name for a in j.after] for j in plan.jobs}
    assert list(after) == [c.name for c in cfgs] and list(after)[0] == TEACHER_NAME
    assert after == {TEACHER_NAME: [], "shapes_demo_student_alone": [], "shapes_demo_dkd": [TEACHER_NAME],
                     "shapes_demo_reviewkd_dkd": [TEACHER_NAME]}
