"""`kdlab demo --task detection`: the detection workflow end to end on kdlab's generated shapes,
no download. `kdlab demo` dispatches here (this module adds no subcommand of its own).

A Faster R-CNN ResNet-18 FPN teacher learns the generated training set; a smaller Faster R-CNN
MobileNetV2 FPN student then trains alone, with DKD on the ROI logits and with ReviewKD + DKD.
The demo prints a COCO AP table and draws a few validation images with the ground truth and
every model's boxes. It is sized to finish in under 5 minutes on 2 CPU cores, which leaves the
students 100 iterations: enough to show every step working, far too few for their AP to rank
the methods (docs/detection.md). The same experiments, long enough to compare, are the files of
configs/shapes/.

The runs are one plan (`kdlab.plan`): the distilled students wait for the teacher, the student
alone for nothing; `--jobs N` trains N at once. The table and the figure are built afterwards
from the run folders, so a run that failed is a row saying so, not a crash.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kdlab.commands._common import DEMO_MARKER, earlier_demo, exec_options

DESCRIPTION = """\
Detection distillation on kdlab's generated shapes (COCO-format files written once, no download):
a Faster R-CNN ResNet-18 FPN teacher, and a Faster R-CNN MobileNetV2 FPN student trained alone,
with DKD on the ROI box classifier, and with ReviewKD on the FPN plus DKD. Prints box AP
(pycocotools COCOeval) and draws validation images with every model's boxes. About 4-5 minutes on
2 CPU cores; the students' runs are too short to rank the methods (configs/shapes/ are not).
The students wait for the teacher (the student alone does not); --jobs N runs N at once."""

#: The demo's set: smaller than configs/shapes' so that everything runs in minutes on a CPU.
SHAPES = {"num_train": 300, "num_val": 40, "height": 64, "width": 80, "min_object": 12, "max_object": 32,
          "max_objects": 3, "seed": 0}
#: The detector options of configs/shapes/_base/detector.yaml.
DETECTOR_KWARGS = {
    "norm": "bn", "anchor_sizes": [16, 32, 64, 128, 256], "representation_size": 256,
    "box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150, "box_detections_per_img": 50,
}
BASE = {
    "task": "detection",
    "data": {"name": "shapes", "batch_size": 4, "num_workers": 0},
    "detection": {"train_sizes": [64], "test_size": 64, "max_size": 80, "hflip": 0.5, "shapes": SHAPES},
    "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "multistep", "unit": "iteration", "warmup_iterations": 50, "warmup_start_factor": 0.001},
}
TEACHER_NAME = "shapes_demo_teacher_fasterrcnn_resnet18"
#: Half the teacher's rate: at 0.02 the distilled students diverged.
STUDENT_LR = 0.01
#: (label, run name, model, method, iterations); the students read the teacher's best.pt.
STEPS = [
    ("teacher (Faster R-CNN R-18 FPN)", TEACHER_NAME, "resnet18", {"name": "det_vanilla"}, 550),
    ("student alone (MobileNetV2 FPN)", "shapes_demo_student_alone", "mobilenet_v2", {"name": "det_vanilla"}, 100),
    ("DKD (ROI logits)", "shapes_demo_dkd", "mobilenet_v2",
     {"name": "det_dkd", "alpha": 1.0, "beta": 0.25, "temperature": 1.0}, 100),
    # Weight 0.1, not the authors' 1.0: from scratch, the HCL term starts near 16 and 1.0 diverged.
    ("ReviewKD + DKD", "shapes_demo_reviewkd_dkd", "mobilenet_v2",
     {"name": "det_reviewkd_dkd", "weight": 0.1, "alpha": 1.0, "beta": 0.25, "temperature": 1.0}, 100),
]


def demo_configs(output_dir: str, scale: float = 1.0, device: str = "auto", progress: bool = True) -> list[dict]:
    """The raw config of every run, the teacher first, with `scale` x the iterations."""
    from kdlab.config import deep_merge  # lazy: keeps `kdlab --help` fast (pydantic, torch)
    from kdlab.engine.run_folder import RunFolder  # lazy: as above

    configs = []
    for _, name, backbone, method, iterations in STEPS:
        n = max(4, round(iterations * scale))
        raw = deep_merge(BASE, {
            "name": name, "output_dir": output_dir,
            "model": {"name": f"det:fasterrcnn_{backbone}_fpn", "kwargs": dict(DETECTOR_KWARGS)},
            "method": dict(method),
            "schedule": {"milestones": [max(1, round(0.8 * n))],
                         "warmup_iterations": min(BASE["schedule"]["warmup_iterations"], n // 2)},
            # Evaluated once, at the end (the trainer always evaluates the last epoch).
            "train": {"iterations": n, "eval_every": 1000, "device": device, "progress": progress,
                      "tensorboard": False},
        })
        if name != TEACHER_NAME:  # the students' rate, as in configs/shapes/_base/student.yaml
            raw["optim"]["lr"] = STUDENT_LR
        if method["name"] != "det_vanilla":
            raw["teacher"] = {"name": "det:fasterrcnn_resnet18_fpn", "kwargs": dict(DETECTOR_KWARGS),
                              "checkpoint": str(RunFolder(Path(output_dir) / TEACHER_NAME).checkpoint("best"))}
        configs.append(raw)
    return configs


def detection_plan(cfgs: list[Any], overwrite: bool, log_dir: Path) -> Any:
    """The demo's plan of the validated configs of `demo_configs`: the teacher first, the
    distilled students waiting for it, the student alone for nothing."""
    from kdlab.plan import Job, Plan  # lazy: keeps `kdlab --help` fast

    plan = Plan("kdlab demo --task detection", log_dir=log_dir)
    teacher = plan.add(Job.train(cfgs[0], resume=False, overwrite=overwrite))
    for cfg in cfgs[1:]:
        after = (teacher.name,) if cfg.teacher is not None else ()
        plan.add(Job.train(cfg, after=after, resume=False, overwrite=overwrite))
    return plan


def _options(args: argparse.Namespace) -> Any:
    """The demo's --jobs/--jobs-per-device/--launcher (defaults when called without them)."""
    from kdlab.plan import ExecOptions  # lazy: as above

    return exec_options(args) if hasattr(args, "jobs") else ExecOptions()


def run(args: argparse.Namespace) -> int:
    """The demo (see the module docstring); `args`: output_dir, figure, scale, device (and the
    --jobs flags)."""
    # lazy: keeps `kdlab --help` fast (torch, torchvision's detectors, matplotlib)
    import torch

    from kdlab.analysis.boxes import draw_detections
    from kdlab.config import load_config
    from kdlab.engine.device import resolve_device
    from kdlab.engine.result import RunResult
    from kdlab.engine.run_folder import RunFolder
    from kdlab.engine.tasks import task_for
    from kdlab.plan import execute
    from kdlab.text_table import print_table

    t0 = time.perf_counter()
    options = _options(args)  # bad flags fail before anything is written
    output_dir = Path(args.output_dir if args.output_dir != "runs/demo" else "runs/demo_detection")
    raws = demo_configs(str(output_dir), args.scale, args.device, sys.stderr.isatty() and options.jobs == 1)
    overwrite = earlier_demo(output_dir, [r["name"] for r in raws])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / DEMO_MARKER).write_text(json.dumps({"runs": [r["name"] for r in raws], "scale": args.scale}) + "\n")
    cfgs = [load_config(data=raw) for raw in raws]
    for (label, *_), cfg in zip(STEPS, cfgs):
        print(f"== {label}: {cfg.train.iterations} iterations", file=sys.stderr)
    plan = detection_plan(cfgs, overwrite, output_dir / "logs")
    report = execute(plan, options)
    if report.failed:
        print(report.table(), end="")

    # Every run as its folder holds it (None: it did not finish).
    folders = [RunFolder(job.run_dir) for job in plan.jobs]
    results = [RunResult.from_json(f.read_result()) if report.ok(job.name) else None
               for f, job in zip(folders, plan.jobs)]
    alone = results[1].last["bbox_ap"] if results[1] else None
    table = []
    for i, ((label, *_), cfg, result, job) in enumerate(zip(STEPS, cfgs, results, plan.jobs)):
        if result is None:
            table.append([label, cfg.method.name, cfg.train.iterations, report.outcomes[job.name].status,
                          "", "", "", ""])
            continue
        seconds = sum(float(r.get("time_s", 0.0)) for r in RunFolder(job.run_dir).read_metrics())
        gain = "" if i < 2 or alone is None else f"{result.last['bbox_ap'] - alone + 0.0:+.2f}"  # + 0.0: no "-0.00"
        table.append([label, cfg.method.name, cfg.train.iterations, result.last["bbox_ap"],
                      result.last["bbox_ap50"], result.best["bbox_ap"], gain, f"{seconds:.0f}"])
    print()
    print_table(["run", "method", "iterations", "box AP last", "AP50 last", "box AP best", "gain", "s"], table)

    # A few validation images: the ground truth, then the detections of every finished model
    # (its last.pt, the weights it ended with).
    task = task_for(cfgs[0])
    data = task.build_data(cfgs[0])  # the one dataset of every run
    val = data.val
    picks = list(range(min(4, len(val))))
    images = [val[i][0] for i in picks]
    truth = []
    for i in picks:
        anns = val.coco.imgToAnns.get(val.ids[i], [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]).reshape(-1, 4)
        truth.append({"boxes": boxes, "labels": torch.tensor([val.category_to_label[a["category_id"]] for a in anns])})
    columns: list[tuple[str, Any]] = [("ground truth", truth)]
    device = resolve_device(args.device)
    for (label, *_), cfg, folder, result in zip(STEPS, cfgs, folders, results):
        if result is None:
            continue
        model_cfg = cfg.model.model_copy(update={"checkpoint": str(folder.checkpoint("last")), "weights": None})
        model, _ = task.build_networks(cfg.model_copy(update={"model": model_cfg, "teacher": None}), data)
        model = model.to(device).eval()
        with torch.no_grad():
            columns.append((label, model([im.as_subclass(torch.Tensor).to(device) for im in images])))
    figure = Path(args.figure) if args.figure else output_dir / "demo_detection.png"
    draw_detections(images, columns, val.class_names, figure,
                    title="kdlab demo --task detection: validation images, boxes scoring >= 0.5")
    versus = f"the student alone's ({alone:.2f})" if alone is not None else "the student alone's (it did not finish)"
    print(f"\nbox AP: COCOeval AP at IoU .50:.95 on the {len(val)} validation images, last iteration; gain: "
          f"minus {versus}. {time.perf_counter() - t0:.0f} s in all.")
    print(f"figure: {figure}")
    print(f"runs: {output_dir}/")
    return report.exit_code()


__all__ = ["DESCRIPTION", "STEPS", "demo_configs", "detection_plan", "run"]
