"""Helpers of the detection tests: a tiny generated shapes set and tiny detectors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import kdlab.data.coco  # noqa: F401  registers the detection dataset names (coco, shapes)
import kdlab.models.detection  # noqa: F401  registers the det: model prefix
from kdlab.schema.detection import ShapesConfig
from kdlab.data.shapes import generate_shapes

#: A shapes set small enough for a test: 64x48 canvases, a few objects of 8-24 pixels.
TINY_SHAPES = ShapesConfig(num_train=8, num_val=4, height=48, width=64, min_object=8, max_object=24,
                           max_objects=3, seed=0)


def tiny_shapes(folder: Path) -> Path:
    return generate_shapes(folder, TINY_SHAPES)


def tiny_kwargs(family: str) -> dict[str, Any]:
    """Detector options for 64-pixel inputs and fast steps."""
    kw: dict[str, Any] = {"norm": "bn", "anchor_sizes": [8, 16, 32, 64, 128], "min_size": 64, "max_size": 96,
                          "skip_train_resize": True}
    if family == "retinanet":
        kw.update(detections_per_img=20, topk_candidates=100)
    else:
        kw.update(rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
                  box_detections_per_img=20)
    return kw


def tiny_config(out: Path, data_root: Path, **sections: Any) -> dict[str, Any]:
    """A raw `task: detection` config on the tiny shapes set (sections override)."""
    from kdlab.config import deep_merge

    base = {
        "name": "det", "output_dir": str(out), "task": "detection",
        "model": {"name": "det:fasterrcnn_mobilenet_v2_fpn", "kwargs": model_kwargs("fasterrcnn")},
        "method": {"name": "det_vanilla"},
        "data": {"name": "shapes", "root": str(data_root), "batch_size": 2, "num_workers": 0},
        "detection": {"train_sizes": [48, 64], "test_size": 64, "max_size": 96,
                      "shapes": TINY_SHAPES.model_dump()},
        "optim": {"lr": 0.005, "weight_decay": 1e-4},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "device": "cpu", "progress": False, "tensorboard": False},
    }
    return deep_merge(base, sections)


def model_kwargs(family: str) -> dict[str, Any]:
    """`tiny_kwargs` without the sizes, which the detection task sets from the config."""
    return {k: v for k, v in tiny_kwargs(family).items() if k not in ("min_size", "max_size", "skip_train_resize")}


def toy_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different orientation with boxes, labels (of 3 classes) and masks."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 64, 48, generator=g)]
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 28.0]]), torch.tensor([[2.0, 10.0, 40.0, 50.0], [20.0, 5.0, 30.0, 15.0]])]
    targets = []
    for im, b, labels in zip(images, boxes, ([1], [2, 3])):
        masks = torch.zeros(len(b), *im.shape[1:], dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": b, "labels": torch.tensor(labels), "masks": masks})
    return images, targets
