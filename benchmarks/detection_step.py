"""A detection training step with kdlab's sparse ROIAlign against torchvision's, on the CPU.

    .venv/bin/python benchmarks/detection_step.py                 # 2 threads, the demo's detectors
    .venv/bin/python benchmarks/detection_step.py --batch 8 --size 128 --steps 10

The step is `kdlab.engine.step.TrainStep`, the trainer's own, on one batch of kdlab's generated
shapes set (the `kdlab demo --task detection` detectors and image size by default): the teacher
alone (Faster R-CNN R-18 FPN, `det_vanilla`) and a distilled student (Faster R-CNN MobileNetV2
FPN with `det_dkd`, whose step also runs the teacher's ROI head on the student's proposals), each
built twice, with `model.kwargs.fast_roi_align` true (kdlab's default) and false (torchvision's
`roi_align`). The four take turns, one step each per round; medians are reported.

Where the time went (profile of the teacher's step, batch 4 at 64x80, before the change): the
backward of torchvision's CPU `roi_align` was 47% of the step: it scatters every sampling point's
four bilinear weights into the feature gradient in one serial loop. kdlab's pooling is one sparse
matrix product over all FPN levels, and its gradient the transposed product (see
kdlab/models/roi_align.py); after it the step is mostly the convolutions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kdlab.commands._demo_detection import DETECTOR_KWARGS  # noqa: E402
from kdlab.config import load_config  # noqa: E402
from kdlab.engine.build import make_distiller  # noqa: E402
from kdlab.engine.distributed import DistInfo  # noqa: E402
from kdlab.engine.step import TrainStep  # noqa: E402
from kdlab.engine.tasks import task_for  # noqa: E402
from kdlab.models.detection import build_detector  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="shorter image side (the demo's 64)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdlab-detstep-") as tmp:
        raw = {
            "name": "bench", "output_dir": tmp, "task": "detection",
            "model": {"name": "det:fasterrcnn_mobilenet_v2_fpn", "kwargs": DETECTOR_KWARGS},
            "method": {"name": "det_vanilla"},
            "data": {"name": "shapes", "batch_size": args.batch, "num_workers": 0},
            "detection": {"train_sizes": [args.size], "test_size": args.size, "max_size": args.size * 5 // 4,
                          "shapes": {"num_train": 4 * args.batch, "num_val": 4, "height": args.size,
                                     "width": args.size * 5 // 4, "min_object": 12,
                                     "max_object": min(32, args.size), "max_objects": 3}},
            "optim": {"lr": 0.01, "weight_decay": 1e-4},
            "train": {"device": "cpu"},
        }
        cfg = load_config(data=raw)
        task = task_for(cfg)
        data = task.build_data(cfg)
        loader = iter(task.train_loader(data, cfg, batch_size=args.batch, device=torch.device("cpu"),
                                        dist=DistInfo()))
        batch = task.to_batch(next(loader), torch.device("cpu"))
        steps = {}
        for fast in (True, False):
            kwargs = {**DETECTOR_KWARGS, "fast_roi_align": fast, "min_size": args.size,
                      "max_size": args.size * 5 // 4, "skip_train_resize": True}
            torch.manual_seed(0)
            alone = build_detector("fasterrcnn_resnet18_fpn", data.num_classes, **kwargs)
            teacher = build_detector("fasterrcnn_resnet18_fpn", data.num_classes, **kwargs)  # frozen, eval
            student = build_detector("fasterrcnn_mobilenet_v2_fpn", data.num_classes, **kwargs)
            label = "kdlab ROIAlign" if fast else "torchvision ROIAlign"
            for name, method, model, t in (("teacher step (R-18, det_vanilla)", "det_vanilla", alone, None),
                                            ("student step (MV2, det_dkd)", "det_dkd", student, teacher)):
                # The teacher section only satisfies validation; the teacher built above is used.
                teacher_section = {"teacher": {"name": "det:fasterrcnn_resnet18_fpn", "checkpoint": "unused.pt"}}
                step_cfg = load_config(data={**raw, "method": {"name": method}, **(teacher_section if t else {})})
                distiller = make_distiller(step_cfg, model, t, input_size=data.input_size,
                                           num_classes=data.num_classes, task="detection").train()
                steps[(name, label)] = TrainStep.for_distiller(distiller, step_cfg.optim, torch.device("cpu"))
        times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
        for r in range(args.warmup + args.steps):
            for key, step in steps.items():
                t0 = time.perf_counter()
                step(batch, 1)
                if r >= args.warmup:
                    times[key].append((time.perf_counter() - t0) * 1000)
    print(f"`python benchmarks/detection_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"batch {args.batch} at {args.size}x{args.size * 5 // 4}, CPU, {args.threads} threads, torch "
          f"{torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up, interleaved\n")
    print("| step | torchvision ROIAlign ms | kdlab ROIAlign ms | speed-up |")
    print("|---|---:|---:|---:|")
    for name in dict.fromkeys(k[0] for k in steps):
        slow = statistics.median(times[(name, "torchvision ROIAlign")])
        fast = statistics.median(times[(name, "kdlab ROIAlign")])
        print(f"| {name} | {slow:.0f} | {fast:.0f} | {slow / fast:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
