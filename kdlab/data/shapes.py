"""A detection and instance-segmentation set kdlab generates itself (no download): coloured
shapes on noisy canvases, written as PNG files plus COCO instances JSONs, so that it goes
through exactly the loader, transforms and evaluator that COCO goes through.

Layout of the folder:

    train/000001.png ...                 val/000001.png ...
    annotations/instances_train.json     annotations/instances_val.json
    kdlab_shapes.json                    the generation settings (a folder is reused only
                                         when they match)

Five classes (circle, square, triangle, ring, cross), 1 to `max_objects` objects per image
at random positions (boxes do not overlap, so each mask is the whole object), object sides
between `min_object` and `max_object` pixels, canvases of `height` x `width` or its
transpose (so that aspect-ratio grouping has two groups), each a random background colour
with pixel noise. Masks are stored as COCO RLE. Everything is a function of `seed`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.schema.detection import ShapesConfig
from kdlab.errors import DataError

CLASSES = ("circle", "square", "triangle", "ring", "cross")
MARKER = "kdlab_shapes.json"
FORMAT_VERSION = 1


def shapes_key(spec: ShapesConfig) -> str:
    """A short digest of the settings, for default folder names."""
    text = json.dumps({"version": FORMAT_VERSION, **spec.model_dump()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) mask of one object filling its box."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2.0
    r = size / 2.0
    if kind == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= r**2
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    if kind == "triangle":  # apex up or down, chosen at random
        t = yy / size if rng.random() < 0.5 else 1.0 - yy / size
        return np.abs(xx - c) <= t * r
    if kind == "ring":
        d2 = (xx - c) ** 2 + (yy - c) ** 2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        w = max(size / 6.0, 1.5)
        return (np.abs(xx - c) <= w) | (np.abs(yy - c) <= w)
    raise ValueError(kind)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util  # lazy: detection-only

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _render(spec: ShapesConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    h, w = (spec.height, spec.width) if rng.random() < 0.5 else (spec.width, spec.height)
    background = rng.integers(0, 256, size=3)
    image = np.clip(background + rng.normal(0, 18, size=(h, w, 3)), 0, 255)
    objects: list[dict[str, Any]] = []
    taken: list[tuple[int, int, int, int]] = []
    wanted = int(rng.integers(1, spec.max_objects + 1))
    for _ in range(40 * wanted):
        if len(objects) == wanted:
            break
        size = int(rng.integers(spec.min_object, min(spec.max_object, h, w) + 1))
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if any(x < bx + bw + 2 and bx < x + size + 2 and y < by + bh + 2 and by < y + size + 2
               for bx, by, bw, bh in taken):
            continue
        kind = int(rng.integers(len(CLASSES)))
        shape = _shape_mask(CLASSES[kind], size, rng)
        # A colour far enough from the background to be visible.
        while True:
            colour = rng.integers(0, 256, size=3)
            if np.abs(colour - background).sum() > 150:
                break
        region = image[y:y + size, x:x + size]
        region[shape] = colour + rng.normal(0, 8, size=(int(shape.sum()), 3))
        mask = np.zeros((h, w), dtype=bool)
        mask[y:y + size, x:x + size] = shape
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        taken.append((x, y, size, size))
        objects.append({"category_id": kind + 1, "bbox": box, "area": float(mask.sum()), "mask": mask})
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _write_split(folder: Path, split: str, count: int, spec: ShapesConfig, rng: np.random.Generator) -> None:
    from PIL import Image  # lazy: detection-only

    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, count + 1):
        pixels, objects = _render(spec, rng)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(folder / split / name)
        images.append({"id": i, "file_name": name, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
        for obj in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": obj["category_id"], "bbox": obj["bbox"],
                "area": obj["area"], "iscrowd": 0, "segmentation": _rle(obj["mask"]),
            })
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    doc = {"info": {"description": f"kdlab generated shapes ({split})"}, "images": images,
           "annotations": annotations, "categories": categories}
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def _write_once(folder: str | Path, settings: dict[str, Any], what: str, write: Any) -> Path:
    """Write a generated set into `folder` with `write(tmp_folder)`, or reuse the folder when it
    already holds the set of exactly these `settings`. Safe when several processes (DDP ranks)
    call it at once: each writes a private temporary folder and the first to finish renames it
    into place."""
    folder = Path(folder).expanduser()
    marker = folder / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != settings:
            raise DataError(
                f"{str(folder)!r} holds {what} made with other settings ({found}); delete the folder to "
                "regenerate it, or point data.root at another folder"
            )
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"data.root {str(folder)!r} is not empty and holds no {what}; point data.root at an empty "
                        f"or new folder for the {what}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(settings))
        if folder.exists():  # an empty folder someone created: replace it
            folder.rmdir()
        os.rename(tmp, folder)
    except OSError:
        if not marker.is_file():  # not another process winning the race: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def generate_shapes(folder: str | Path, spec: ShapesConfig | None = None) -> Path:
    """Write the set described by `spec` into `folder` (created), or reuse it when it already
    holds exactly that set (see `_write_once`)."""
    spec = spec or ShapesConfig()

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(spec.seed)
        _write_split(tmp, "train", spec.num_train, spec, rng)
        _write_split(tmp, "val", spec.num_val, spec, rng)

    return _write_once(folder, {"version": FORMAT_VERSION, **spec.model_dump()}, "a generated shapes set", write)


def generate_shape_classes(folder: str | Path, num_train: int = 1500, num_val: int = 300, size: int = 32,
                           min_object: int = 10, max_object: int = 28, seed: int = 0) -> Path:
    """A classification version of the generated shapes, in torchvision's ImageFolder layout
    (`<folder>/train/<class>/000001.png`, `<folder>/val/<class>/...`): one object of one of the
    five classes on a `size` x `size` noisy canvas, drawn as the detection set draws them. It is
    the detection demo's stand-in for ImageNet: its backbones are pretrained on it
    (`data.name: imagefolder`) before they learn to detect, as the papers' students start from
    ImageNet weights. Written once, then reused while the settings match."""
    spec = ShapesConfig(num_train=num_train, num_val=num_val, height=size, width=size, min_object=min_object,
                        max_object=max_object, max_objects=1, seed=seed)

    def write(tmp: Path) -> None:
        from PIL import Image  # lazy: detection-only

        rng = np.random.default_rng(seed)
        for split, count in (("train", num_train), ("val", num_val)):
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in range(1, count + 1):
                pixels, objects = _render(spec, rng)
                kind = CLASSES[objects[0]["category_id"] - 1]
                Image.fromarray(pixels).save(tmp / split / kind / f"{i:06d}.png")

    settings = {"version": FORMAT_VERSION, "kind": "classes", **spec.model_dump()}
    return _write_once(folder, settings, "generated shape classes", write)


__all__ = ["CLASSES", "generate_shape_classes", "generate_shapes", "shapes_key"]
