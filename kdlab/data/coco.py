"""COCO-format detection and instance-segmentation data: an images folder plus an instances
JSON, read through torchvision's `CocoDetection` and `wrap_dataset_for_transforms_v2`, with
transforms v2 carrying the boxes and masks.

`CocoSplit` is one split. Training splits follow Detectron2's COCO loader: crowd annotations
are dropped from the targets and images left without any annotation are skipped. A
validation split keeps every image (pycocotools' COCOeval scores them all, against the
annotation file itself) and returns only the image id as target.

Labels: `contiguous` (default) numbers the categories 1..C in the order of their ids (0 is
the background of torchvision's detectors); `category_id` uses the COCO category ids
themselves (C = the largest id), which torchvision's COCO-trained detectors expect (91
outputs for COCO).

Everything is checked when a split is opened, before training starts: an unreadable or
malformed annotation file, duplicate image or annotation ids, unknown categories, images
missing from disk and a validation split with nothing to score are one `DataError` each,
naming the file, the image and the fix. Invalid boxes (not finite, of non-positive size, or
entirely outside their image) are left out with a logged count (`invalid_boxes="drop"`, the
default: Detectron2 and torchvision drop them too, silently) or refused (`"error"`); both
splits are read alike, so COCOeval scores against the same boxes training saw. Box values of
any numeric type are read as floats (labelling tools often export integers).
An image file that cannot be decoded is one `UnreadableImage` naming it, when it is read.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection

from kdlab.schema.detection import DetectionConfig
from kdlab.schema.experiment import DataConfig
from kdlab.data.datasets import register_dataset
from kdlab.data.shapes import generate_shapes, shapes_key
from kdlab.data.folder import load_rgb
from kdlab.errors import DataError

log = logging.getLogger("kdlab")

Labels = Literal["contiguous", "category_id"]
InvalidBoxes = Literal["drop", "error"]

#: Keys every COCO element must have for detection (segmentation only when masks are read).
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_KEYS = ("id", "name")


def read_annotations(path: str | Path, *, masks: bool, what: str) -> dict[str, Any]:
    """The parsed instances JSON at `path`, checked for what detection needs, or a DataError.

    `what` names the setting the path came from, for the message."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {str(path)!r} does not exist; set {what} to a COCO instances JSON "
                        "(e.g. annotations/instances_train2017.json under data.root)")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise DataError(f"annotation file {str(path)!r} is not a text (JSON) file; set {what} to a COCO "
                        "instances JSON") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"annotation file {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                        f"column {exc.colno}); fix or replace the file (a COCO instances JSON)") from None
    _check_structure(data, path, masks)
    return data


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"annotation file {str(path)!r} is not a COCO instances file: {problem}. A COCO file is an "
                     "object with lists 'images' (id, file_name, height, width), 'annotations' (id, image_id, "
                     "category_id, bbox [x, y, w, h], segmentation, iscrowd) and 'categories' (id, name)")


def _check_structure(data: Any, path: Path, masks: bool) -> None:
    if not isinstance(data, dict):
        raise _bad(path, f"the top level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _bad(path, f"it has no '{key}' list")
    if not data["categories"]:
        raise _bad(path, "'categories' is empty")
    for kind, items, keys in (("image", data["images"], _IMAGE_KEYS), ("category", data["categories"], _CATEGORY_KEYS),
                              ("annotation", data["annotations"], _ANN_KEYS + (("segmentation",) if masks else ()))):
        for i, item in enumerate(items):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise _bad(path, f"{kind} #{i} lacks {', '.join(repr(k) for k in missing)}"
                                 + (" (Mask R-CNN needs masks)" if missing == ["segmentation"] else ""))
    image_ids = {img["id"] for img in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    if not all(isinstance(c, int) and c > 0 for c in category_ids):
        raise _bad(path, "category ids must be positive integers")
    for img in data["images"]:
        if not all(_is_number(img[k]) and img[k] > 0 for k in ("height", "width")):
            raise _bad(path, f"image {img['id']!r} has height {img['height']!r} and width {img['width']!r}, not "
                             "two positive numbers of pixels")
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise _bad(path, f"annotation {ann['id']} refers to image {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise _bad(path, f"annotation {ann['id']} has category {ann['category_id']!r}, which is not in "
                             f"'categories' (image {ann['image_id']!r})")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise _bad(path, f"annotation {ann['id']} has bbox {box!r}, not [x, y, width, height]")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unique_ids(data: dict[str, Any], path: Path) -> None:
    """A DataError for an image or annotation id used twice: pycocotools would pair one image's
    boxes with another image's file, or lose an annotation, without a word."""
    files: dict[Any, str] = {}
    for img in data["images"]:
        if img["id"] in files:
            raise DataError(f"annotation file {str(path)!r}: image id {img['id']!r} is used twice "
                            f"({files[img['id']]!r} and {img['file_name']!r}); give every image its own id (and "
                            "point its annotations at it)")
        files[img["id"]] = img["file_name"]
    owners: dict[Any, Any] = {}
    for ann in data["annotations"]:
        if ann["id"] in owners:
            raise DataError(f"annotation file {str(path)!r}: annotation id {ann['id']!r} is used twice (images "
                            f"{owners[ann['id']]!r} and {ann['image_id']!r}); give every annotation its own id")
        owners[ann["id"]] = ann["image_id"]


def box_problem(box: Sequence[float], width: float, height: float) -> str | None:
    """Why a COCO [x, y, w, h] box in a `width` x `height` image cannot be trained or scored
    (None when it can). A box that leaves the image only in part is kept, as COCO's own are."""
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        return "is not finite"
    if w <= 0 or h <= 0:
        return "has a size that is not positive"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"lies outside its {width:g}x{height:g} image"
    return None


def check_boxes(data: dict[str, Any], path: Path, invalid_boxes: InvalidBoxes) -> None:
    """Read every box as floats, and leave out (`drop`, logged with a count) or refuse (`error`)
    the invalid ones; in place. Every box invalid is an error either way."""
    images = {img["id"]: img for img in data["images"]}
    kept, bad = [], []
    for ann in data["annotations"]:
        ann["bbox"] = [float(v) for v in ann["bbox"]]
        img = images[ann["image_id"]]
        problem = box_problem(ann["bbox"], img["width"], img["height"])
        if problem is None:
            kept.append(ann)
        else:
            bad.append(f"annotation {ann['id']} (image {ann['image_id']!r}, {img['file_name']!r}): bbox "
                       f"{ann['bbox']} {problem}")
    if not bad:
        return
    total = len(data["annotations"])
    shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if not kept:
        raise DataError(f"every one of the {total} boxes of {str(path)!r} is invalid ({shown}); a box is "
                        "[x, y, width, height] in pixels, of positive size and inside its image: fix the file")
    if invalid_boxes == "error":
        raise DataError(f"{len(bad)} of the {total} boxes of {str(path)!r} are invalid: {shown}. A box is "
                        "[x, y, width, height] in pixels, of positive size and inside its image: fix or remove "
                        "them, or set detection.invalid_boxes=drop to leave them out (with a count)")
    log.warning("%s: left out %d of the %d boxes, which are invalid (%s); detection.invalid_boxes=error makes "
                "this an error", path, len(bad), total, shown)
    data["annotations"] = kept


def check_scorable(data: dict[str, Any], path: Path, what: str) -> None:
    """A DataError for a validation split COCOeval could score nothing on (AP would be NaN)."""
    if not data["images"]:
        raise DataError(f"annotation file {str(path)!r} lists no images; a validation split needs annotated "
                        f"images: point {what} at another file")
    if not data["annotations"]:
        raise DataError(f"annotation file {str(path)!r} has no annotations, so COCO AP would have nothing to "
                        f"score (best bbox_ap nan, no best.pt); point {what} at an annotated validation file")
    if all(a.get("iscrowd", 0) for a in data["annotations"]):
        raise DataError(f"annotation file {str(path)!r} holds only crowd regions (iscrowd 1), which COCO AP "
                        f"ignores: nothing to score; point {what} at a validation file with objects")


def check_images_exist(images: Sequence[dict[str, Any]], folder: Path, annotation_file: Path, what: str) -> None:
    """A DataError naming the images of the annotation file that are not in `folder`."""
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist; set {what} to the folder holding the images "
                        f"of {str(annotation_file)!r}")
    listed = set(os.listdir(folder))
    missing = [img["file_name"] for img in images
               if img["file_name"] not in listed and not (folder / img["file_name"]).is_file()]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} of the {len(images)} images listed in {str(annotation_file)!r} are missing "
                        f"from {str(folder)!r} ({shown}); put them there, or point {what} at the folder that holds "
                        "them")


def label_maps(categories: Sequence[dict[str, Any]], labels: Labels) -> tuple[dict[int, int], list[int], list[str]]:
    """(category id -> label, label -> category id (index 0 unused), class names of labels 1..C)."""
    cats = sorted(categories, key=lambda c: c["id"])
    if labels == "category_id":
        top = cats[-1]["id"]
        names = {c["id"]: str(c["name"]) for c in cats}
        return ({c["id"]: c["id"] for c in cats}, list(range(top + 1)),
                [names.get(i, f"(unused id {i})") for i in range(1, top + 1)])
    return ({c["id"]: i + 1 for i, c in enumerate(cats)}, [0] + [c["id"] for c in cats], [str(c["name"]) for c in cats])


class _CocoImages(CocoDetection):
    """CocoDetection whose undecodable image files are one `UnreadableImage` naming the file."""

    def _load_image(self, id: int) -> Any:
        return load_rgb(os.path.join(self.root, self.coco.imgs[id]["file_name"]))


def _indexed_coco_detection(images: Path, coco: Any) -> Any:
    """torchvision's CocoDetection over an already-built pycocotools index (CocoDetection
    itself would parse the annotation file a second time)."""
    from torchvision.datasets.vision import VisionDataset  # lazy: detection-only

    dataset = _CocoImages.__new__(_CocoImages)
    VisionDataset.__init__(dataset, str(images))
    dataset.coco = coco
    dataset.ids = sorted(coco.imgs)
    return dataset


class CocoSplit(Dataset):
    """One COCO-format split; items are `(image, target)` after `transforms`.

    Training target: `boxes` (K, 4) xyxy, `labels` (K,), `masks` (K, H, W) when `masks`, and
    `image_id`. Validation target: `image_id` only.

    Attributes: `coco` (pycocotools' index of the annotation file, invalid boxes left out),
    `ids` (the image ids served, in order), `aspect_ratios` (width / height of each served
    image), `label_to_category`, `class_names`, `num_classes`.

    `invalid_boxes`: "drop" leaves invalid boxes out with a logged count, "error" refuses them
    (see `check_boxes`).
    """

    def __init__(self, images: str | Path, annotations: str | Path, *, train: bool, masks: bool = False,
                 transforms: Any = None, labels: Labels = "contiguous", invalid_boxes: InvalidBoxes = "drop",
                 what: tuple[str, str] = ("the image folder", "the annotation file")) -> None:
        from pycocotools.coco import COCO  # lazy: detection-only
        from torchvision.datasets import wrap_dataset_for_transforms_v2  # lazy: detection-only

        images, annotations = Path(images), Path(annotations)
        data = read_annotations(annotations, masks=masks and train, what=what[1])
        _check_unique_ids(data, annotations)
        check_boxes(data, annotations, invalid_boxes)
        if not train:
            check_scorable(data, annotations, what[1])
        check_images_exist(data["images"], images, annotations, what[0])
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()

        base = _indexed_coco_detection(images, coco)
        if train:  # Detectron2's filter_empty_annotations: only images with a non-crowd object
            base.ids = [i for i in base.ids if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, ()))]
        keys = {"image_id"}
        if train:
            keys |= {"boxes", "labels", "iscrowd"} | ({"masks"} if masks else set())
        self.base = base
        self.wrapped = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.coco = coco
        self.train = train
        self.masks = masks
        self.transforms = transforms
        self.category_to_label, self.label_to_category, self.class_names = label_maps(data["categories"], labels)
        self.num_classes = len(self.class_names)

    @property
    def ids(self) -> list[int]:
        return self.base.ids

    @property
    def aspect_ratios(self) -> list[float]:
        """Width / height of each served image, from the annotation file (no image is read)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.base.ids]

    def keep_only(self, image_ids: Sequence[int]) -> None:
        """Serve only these images (a training subset), in the split's order."""
        keep = set(image_ids)
        self.base.ids = [i for i in self.base.ids if i in keep]

    def __len__(self) -> int:
        return len(self.base.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.wrapped[index]
        if self.train:
            target = self._train_target(target)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _train_target(self, target: dict[str, Any]) -> dict[str, Any]:
        from torchvision import tv_tensors  # lazy: detection-only

        # Training images all have annotations (see __init__), so the wrapper filled every key.
        keep = torch.tensor([not c for c in target["iscrowd"]], dtype=torch.bool)
        labels = torch.tensor([self.category_to_label[int(c)] for c in target["labels"]], dtype=torch.int64)
        out = {"image_id": target["image_id"], "boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]),
               "labels": labels[keep]}
        if self.masks:
            out["masks"] = tv_tensors.wrap(target["masks"][keep], like=target["masks"])
        return out


def detection_transforms(train: bool, *, sizes: Sequence[int] = (640, 672, 704, 736, 768, 800),
                         max_size: int = 1333, hflip: float = 0.5) -> Any:
    """Transforms v2 for `CocoSplit`: training resizes the shorter side to one of `sizes`
    (chosen per image, longer side capped at `max_size`: Detectron2's ResizeShortestEdge
    "choice"), flips horizontally with probability `hflip` and drops boxes left degenerate;
    both convert to float images in [0, 1]. Evaluation does not resize: the detector
    resizes its inputs to the test size itself."""
    from torchvision.transforms import v2  # lazy: detection-only

    steps: list[Any] = [v2.ToImage()]
    if train:
        steps.append(v2.RandomShortestSize(min_size=list(sizes), max_size=max_size, antialias=True))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        steps.append(v2.SanitizeBoundingBoxes())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def collate_detection(batch: Sequence[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    """Lists, not stacks: detection images differ in size (the detector pads them itself)."""
    return tuple(zip(*batch))


class DetectionFiles(NamedTuple):
    """Where a COCO-format detection dataset is: what a `task: detection` dataset's builder,
    ``fn(data: DataConfig, det: DetectionConfig, output_dir: str) -> DetectionFiles``, returns."""

    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path


@register_dataset("shapes", task="detection")
def shapes_files(data: DataConfig, det: DetectionConfig, output_dir: str) -> DetectionFiles:
    """The generated shapes set (`det.shapes`), generated first when it is not there yet: in
    `data.root`, else in `<output_dir>/_data/shapes-<key of its settings>`."""
    root = Path(data.root) if data.root else Path(output_dir) / "_data" / f"shapes-{shapes_key(det.shapes)}"
    generate_shapes(root, det.shapes)
    return DetectionFiles(root / "train", root / "annotations" / "instances_train.json",
                          root / "val", root / "annotations" / "instances_val.json")


@register_dataset("coco", task="detection")
def coco_files(data: DataConfig, det: DetectionConfig, output_dir: str) -> DetectionFiles:
    """COCO (or any COCO-format set) under `data.root`, at the `detection:` section's paths."""
    if not data.root:
        raise DataError("data.root is not set for dataset 'coco'; set data.root to the COCO folder (holding "
                        "train2017/, val2017/ and annotations/), or the detection: paths to absolute ones")
    root = Path(data.root).expanduser()
    return DetectionFiles(root / det.train_images, root / det.train_annotations, root / det.val_images,
                          root / det.val_annotations)


__all__ = [
    "DetectionFiles", "coco_files", "shapes_files",
    "CocoSplit", "InvalidBoxes", "Labels", "box_problem", "check_boxes", "check_images_exist", "check_scorable",
    "collate_detection", "detection_transforms", "label_maps",
    "read_annotations",
]
