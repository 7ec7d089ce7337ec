"""Tasks: what differs between classification and detection training (see `base.Task`)."""
from __future__ import annotations

from kdlab.schema.experiment import ExperimentConfig
from kdlab.engine.tasks.base import Task, TaskData
from kdlab.engine.tasks.classification import ClassificationTask


def task_for(cfg: ExperimentConfig) -> Task:
    """The task an experiment config trains (`task:`, classification by default)."""
    if cfg.task == "detection":
        # Detection pulls in torchvision's detectors and pycocotools; only detection runs pay for it.
        from kdlab.engine.tasks.detection import DetectionTask  # lazy: keeps classification start-up lean

        return DetectionTask()
    return ClassificationTask()


__all__ = ["ClassificationTask", "Task", "TaskData", "task_for"]
