"""The `detection:` section of an experiment config (`task: detection`, docs/detection.md).

Where the COCO-format files are, how images are sized and flipped, how labels are numbered,
and the settings of the generated `shapes` set. The detector itself is `model.name`
(`det:fasterrcnn_resnet18_fpn`, ...) with its options in `model.kwargs`.

This module imports nothing from the rest of kdlab (the schema imports it), so its classes
repeat `StrictModel`'s one-line setting instead of subclassing it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

#: The authors' (Detectron2's) multi-scale training sizes of the shorter side.
COCO_TRAIN_SIZES = (640, 672, 704, 736, 768, 800)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShapesConfig(_Section):
    """The generated shapes set (`data.name: shapes`, kdlab/data/shapes.py): written once into
    `data.root` (default `<output_dir>/_data/shapes-<digest of these settings>`)."""

    num_train: PositiveInt = 600
    num_val: PositiveInt = 150
    height: int = Field(default=96, ge=32, description="canvas side; half the images are height x width, "
                                                      "half width x height")
    width: int = Field(default=128, ge=32)
    min_object: int = Field(default=14, ge=6, description="smallest object side, pixels")
    max_object: int = Field(default=44, ge=6, description="largest object side, pixels")
    max_objects: PositiveInt = Field(default=4, description="objects per image: 1 to this many")
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> "ShapesConfig":
        if self.min_object > self.max_object:
            raise ValueError(f"shapes.min_object={self.min_object} is larger than shapes.max_object={self.max_object}")
        if self.max_object > min(self.height, self.width):
            raise ValueError(f"shapes.max_object={self.max_object} does not fit a {self.height}x{self.width} canvas; "
                             "lower it or enlarge the canvas")
        return self


class DetectionConfig(_Section):
    """Detection data settings. Paths are relative to `data.root` (absolute ones are kept);
    the defaults are COCO 2017's layout. The `shapes` set has its own fixed layout."""

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    labels: Literal["contiguous", "category_id"] = Field(
        default="contiguous",
        description="contiguous: categories numbered 1..C in id order; category_id: the ids themselves "
        "(torchvision's COCO weights: 91 outputs)",
    )
    invalid_boxes: Literal["drop", "error"] = Field(
        default="drop",
        description="boxes that are not finite, of non-positive size or entirely outside their image: drop: "
        "left out of both splits with a logged count; error: refused, naming each (docs/detection.md)",
    )
    train_sizes: list[PositiveInt] = Field(
        default_factory=lambda: list(COCO_TRAIN_SIZES),
        description="shorter side of each training image, drawn per image from this list",
    )
    test_size: PositiveInt = Field(default=800, description="shorter side at evaluation")
    max_size: PositiveInt = Field(default=1333, description="cap of the longer side (training and evaluation)")
    hflip: float = Field(default=0.5, ge=0.0, le=1.0, description="horizontal flip probability in training")
    group_aspect_ratio: bool = Field(default=True, description="batch landscape with landscape, portrait with portrait")
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)

    @field_validator("train_sizes")
    @classmethod
    def _non_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("train_sizes needs at least one size")
        return v


__all__ = ["COCO_TRAIN_SIZES", "DetectionConfig", "ShapesConfig"]
