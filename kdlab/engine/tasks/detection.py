"""Object detection and instance segmentation (`task: detection`, docs/detection.md):
torchvision detectors, COCO-format data (COCO itself or the generated `shapes` set),
aspect-ratio grouped batches that resume exactly, and COCO AP from pycocotools' COCOeval,
gathered across DDP ranks.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdlab.schema.detection import DetectionConfig
from kdlab.schema.experiment import ExperimentConfig, ModelConfig
from kdlab.data.coco import CocoSplit, DetectionFiles, collate_detection, detection_transforms
from kdlab.data.coco_eval import coco_metrics, detections_to_coco
from kdlab.data.datasets import DATASETS, DataBundle, dataset_task
from kdlab.data.grouped import GroupedBatchSampler
from kdlab.data.loading import loader_options
from kdlab.data.sampling import SeededDataset
from kdlab.engine.checkpoint import Checkpoint, rebuild_model
from kdlab.engine.distributed import DistInfo, ShardSampler
from kdlab.engine.evaluate import autocast_context
from kdlab.engine.tasks.base import Task, TaskData
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.methods.base import Batch
from kdlab.models.detection import PREFIX, build_detector, checkpoint_options, parse_detector_name

#: torchvision's detector normalisation (ImageNet statistics), recorded in the DataBundle.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def detection_settings(cfg: ExperimentConfig) -> DetectionConfig:
    """The run's `detection:` section (its defaults when the config has none)."""
    return cfg.detection if cfg.detection is not None else DetectionConfig()


def _check_data_options(cfg: ExperimentConfig) -> None:
    data = cfg.data
    if dataset_task(data.name) != "detection":
        names = [n for n in DATASETS.names() if dataset_task(n) == "detection"]
        raise ConfigError(f"task: detection reads COCO-format data: set data.name to one of "
                          f"{', '.join(names)} (got {data.name!r})")
    unsupported = {
        "data.label_noise": data.label_noise > 0, "data.pipeline": data.pipeline != "standard",
        "data.augment": data.augment != "standard", "data.transform": data.transform is not None,
        "teacher.cache": cfg.teacher is not None and bool(cfg.teacher.cache),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not available with task: detection (detection augmentation is set "
                          "in the detection: section); remove them")


def data_paths(cfg: ExperimentConfig) -> DetectionFiles:
    """Where the run's data is, from its dataset's builder (`kdlab.data.coco.DetectionFiles`;
    the shapes set is generated first when it is not there yet)."""
    return DATASETS.get(cfg.data.name)(cfg.data, detection_settings(cfg), cfg.output_dir)


class DetectionLoader:
    """A DataLoader over grouped batches, exposing the batch sampler as `sampler` (the
    trainer's `sampler.set_epoch(epoch, start)` hook)."""

    def __init__(self, loader: DataLoader, sampler: GroupedBatchSampler) -> None:
        self.loader, self.sampler = loader, sampler

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)


class DetectionTask(Task):
    name = "detection"
    primary_metric = "bbox_ap"
    reported_metrics = ("bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_aps", "bbox_apm", "bbox_apl",
                        "segm_ap", "segm_ap50", "segm_ap75")
    headline_metrics = ("bbox_ap", "bbox_ap50", "segm_ap")

    # ------------------------------------------------------------------ data
    def build_data(self, cfg: ExperimentConfig) -> TaskData:
        _check_data_options(cfg)
        det = detection_settings(cfg)
        masks = parse_detector_name(self._model_name(cfg.model, "model")).has_masks
        train_images, train_ann, val_images, val_ann = data_paths(cfg)
        train = CocoSplit(train_images, train_ann, train=True, masks=masks, labels=det.labels,
                          invalid_boxes=det.invalid_boxes,
                          transforms=detection_transforms(True, sizes=det.train_sizes, max_size=det.max_size,
                                                          hflip=det.hflip),
                          what=("detection.train_images", "detection.train_annotations"))
        val = CocoSplit(val_images, val_ann, train=False, labels=det.labels, transforms=detection_transforms(False),
                        invalid_boxes=det.invalid_boxes,
                        what=("detection.val_images", "detection.val_annotations"))
        if train.class_names != val.class_names:
            raise DataError(f"the training and validation annotation files have different categories "
                            f"({train.class_names} vs {val.class_names}); both must list the same 'categories'")
        if len(train) == 0:
            raise DataError(f"no training image of {str(train_ann)!r} has an annotation; detection needs annotated "
                            "images")
        if cfg.data.train_subset is not None:
            if cfg.data.train_subset > len(train):
                raise DataError(f"data.train_subset={cfg.data.train_subset} is larger than the {len(train)} annotated "
                                "training images; lower it or remove it")
            perm = np.random.default_rng(cfg.data.subset_seed).permutation(len(train))
            train.keep_only([train.ids[i] for i in perm[:cfg.data.train_subset]])
        return DataBundle(train=train, val=val, num_classes=train.num_classes, class_names=list(train.class_names),
                          input_size=(3, det.test_size, det.test_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    # ------------------------------------------------------------------ networks
    @staticmethod
    def _model_name(mcfg: ModelConfig, role: str) -> str:
        if not mcfg.name.startswith(PREFIX + ":"):
            raise ConfigError(f"task: detection trains detectors: set {role}.name to a {PREFIX}:<detector> name "
                              f"such as {PREFIX}:fasterrcnn_resnet50_fpn (got {mcfg.name!r}); docs/detection.md lists them")
        parse_detector_name(mcfg.name)
        return mcfg.name

    def _network(self, mcfg: ModelConfig, role: str, num_classes: int, det: DetectionConfig) -> nn.Module:
        name = self._model_name(mcfg, role)
        sizes = {"min_size": det.test_size, "max_size": det.max_size, "skip_train_resize": True}
        if not mcfg.checkpoint:
            kwargs = dict(mcfg.kwargs)
            if mcfg.weights:
                kwargs["weights"] = mcfg.weights
            return build_detector(name, num_classes, **kwargs, **sizes)
        ckpt = Checkpoint.load(mcfg.checkpoint)
        record = ckpt.model
        if record.num_classes != num_classes:
            raise CheckpointError(
                f"{role}.checkpoint {mcfg.checkpoint!r} detects {record.num_classes} object classes but the dataset has "
                f"{num_classes}; teacher and student must share the categories: use a checkpoint trained on this "
                "dataset (with the same detection.labels)"
            )
        # The checkpoint holds every weight: initial weight files are not read again.
        kwargs = checkpoint_options(name, {**record.kwargs, **mcfg.kwargs}, mcfg.weights)
        return rebuild_model(ckpt, mcfg.checkpoint, name, num_classes, {**kwargs, **sizes})

    def build_networks(self, cfg: ExperimentConfig, data: TaskData) -> tuple[nn.Module, nn.Module | None]:
        det = detection_settings(cfg)
        student = self._network(cfg.model, "model", data.num_classes, det)
        teacher = self._network(cfg.teacher, "teacher", data.num_classes, det) if cfg.teacher is not None else None
        return student, teacher

    # ------------------------------------------------------------------ loaders
    def train_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int, device: torch.device,
                     dist: DistInfo) -> Iterable:
        seeded = SeededDataset(data.train, cfg.train.seed)
        sampler = GroupedBatchSampler(data.train.aspect_ratios, batch_size, seed=cfg.train.seed,  # type: ignore[attr-defined]
                                      num_replicas=dist.world_size, rank=dist.rank,
                                      group=detection_settings(cfg).group_aspect_ratio)
        # The loader's own generator: starting an epoch's iterator then draws its base seed from it,
        # not from the global RNG, which the detector's proposal samplers use and which a resumed
        # run restores mid-epoch (drawing from it here would shift every later proposal draw).
        loader = DataLoader(seeded, batch_sampler=sampler, collate_fn=collate_detection,
                            **loader_options(cfg.data, device.type),
                            generator=torch.Generator().manual_seed(cfg.train.seed))
        return DetectionLoader(loader, sampler)

    def eval_loader(self, data: TaskData, cfg: ExperimentConfig, *, batch_size: int | None, device: torch.device,
                    dist: DistInfo) -> Iterable:
        # Each rank detects on its own shard; evaluate() gathers the detections.
        shard = ShardSampler(len(data.val), dist) if dist.enabled else None
        return DataLoader(data.val, batch_size=batch_size or max(cfg.data.batch_size // dist.world_size, 1),
                          sampler=shard, shuffle=False, collate_fn=collate_detection,
                          **loader_options(cfg.data, device.type))

    def to_batch(self, raw: Any, device: torch.device, *, channels_last: bool = False) -> Batch:
        # (images, targets, indices) from SeededDataset + collate_detection. tv_tensors become
        # plain tensors: the detector does its own arithmetic on them.
        images, targets, indices = raw
        images = [im.as_subclass(torch.Tensor).to(device, non_blocking=True) for im in images]
        keys = ("boxes", "labels", "masks")
        moved = [{k: t[k].as_subclass(torch.Tensor).to(device, non_blocking=True) for k in keys if k in t}
                 for t in targets]
        return Batch(images, moved, torch.as_tensor(indices, device=device),
                     extras={"image_ids": [int(t["image_id"]) for t in targets]})

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, data: TaskData, cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, float]:
        val: CocoSplit = data.val  # type: ignore[assignment]
        masks = parse_detector_name(cfg.model.name).has_masks
        was_training = model.training
        model.eval()
        records: list[dict[str, Any]] = []
        try:
            for images, targets in loader:
                with autocast_context(device, cfg.train.amp):
                    outputs = model([im.as_subclass(torch.Tensor).to(device, non_blocking=True) for im in images])
                records += detections_to_coco(outputs, [int(t["image_id"]) for t in targets], val.label_to_category,
                                              masks=masks)
        finally:
            model.train(was_training)
        return gathered_coco_metrics(val, records, ("bbox", "segm") if masks else ("bbox",))


def gathered_coco_metrics(val: CocoSplit, records: list[dict[str, Any]], iou_types: tuple[str, ...]) -> dict[str, float]:
    """COCO metrics of every rank's detections: gathered on rank 0, scored once, and the
    metrics broadcast so every rank returns the same values."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return coco_metrics(val.coco, records, iou_types, image_ids=val.ids)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        box[0] = coco_metrics(val.coco, [r for part in gathered for r in part], iou_types, image_ids=val.ids)
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["DetectionLoader", "DetectionTask", "data_paths", "detection_settings", "gathered_coco_metrics"]
