"""COCO average precision with pycocotools' COCOeval, the number detection papers report.

`detections_to_coco` turns a torchvision detector's outputs (boxes xyxy in original image
pixels, scores, labels, and for Mask R-CNN per-detection mask probabilities) into COCO result
records; `coco_metrics` scores records against the ground-truth index with COCOeval.

Metric names (percentages, like the papers): `bbox_ap` (AP at IoU .50:.95), `bbox_ap50`,
`bbox_ap75`, `bbox_aps` / `bbox_apm` / `bbox_apl` (small / medium / large objects), and the
same with `segm_` for masks. COCOeval's -1 (no ground truth of that size) becomes NaN.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Iterable, Sequence

import numpy as np
from torch import Tensor

#: COCOeval.stats index -> metric suffix.
_STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
IOU_TYPES = ("bbox", "segm")


def metric_names(iou_types: Iterable[str]) -> list[str]:
    """The metric names `coco_metrics` returns for `iou_types`."""
    return [f"{t}_{s}" for t in iou_types for s in _STATS]


def detections_to_coco(outputs: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                       label_to_category: Sequence[int], *, masks: bool = False,
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result records of detector outputs, one list for all images.

    Boxes become [x, y, width, height]; labels map back to category ids; masks (N, 1, H, W)
    probabilities are thresholded at `mask_threshold` and run-length encoded."""
    records: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if masks:
            from pycocotools import mask as mask_util  # lazy: detection-only

            binary = (out["masks"].detach()[:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for k, (box, score, label) in enumerate(zip(xywh.tolist(), scores, labels)):
            record = {"image_id": int(image_id), "category_id": int(label_to_category[int(label)]),
                      "bbox": [round(v, 3) for v in box], "score": float(score)}
            if rles is not None:
                rle = dict(rles[k])
                rle["counts"] = rle["counts"].decode("ascii")
                record["segmentation"] = rle
            records.append(record)
    return records


def coco_metrics(coco_gt: Any, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",),
                 image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCOeval's summary (as percentages) of `results` against the ground-truth index
    `coco_gt` (a pycocotools COCO), over `image_ids` (default: every image of `coco_gt`).

    A metric COCOeval leaves undefined (no ground-truth object of that size) is NaN. With no
    detections at all, COCOeval runs against an empty result set (pycocotools' `loadRes`
    cannot take an empty list): AP is 0 where there are objects to find, NaN where there are none."""
    from pycocotools.cocoeval import COCOeval  # lazy: detection-only

    if image_ids is None:
        image_ids = sorted(coco_gt.getImgIds())
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")
        records = copy.deepcopy(results)  # loadRes adds 'area', 'id', ... to the records it gets
        if iou_type == "segm":
            # Without a box, loadRes takes each record's area from its mask, which is what the
            # small/medium/large split of mask AP must use (as Detectron2's evaluator does).
            for r in records:
                r.pop("bbox", None)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
            coco_dt = coco_gt.loadRes(records) if records else _no_detections(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(_STATS, ev.stats[:6]):
            metrics[f"{iou_type}_{name}"] = float(value) * 100.0 if value >= 0 else math.nan
    return metrics


def _no_detections(coco_gt: Any) -> Any:
    """An empty detection set over `coco_gt`'s images, which `loadRes` refuses to build."""
    from pycocotools.coco import COCO  # lazy: detection-only

    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty


__all__ = ["IOU_TYPES", "coco_metrics", "detections_to_coco", "metric_names"]
