"""The names `task:` accepts and the settings each task owns, kept in the schema layer so that
config validation refuses an unknown task, or a stray task section, before anything runs.

A task's code (`kdlab.engine.tasks`: data, networks, batches, metrics, `primary_metric`) sits
in the engine, above the config layer, so the schema cannot import it. `TASKS` therefore maps
a name either to the task class itself (a plugin's `kdlab.engine.tasks.register_task`) or to
where the class is, as "module:Class" (the built-in tasks: the engine imports that module when
a run needs it, so validating a classification config never loads torchvision's detectors).

A task may own a settings section: a top-level key of the experiment config holding a pydantic
model of the task's own. `TASK_SETTINGS` maps the task's name to its `TaskSettings` (the section
and its class): `task: detection` reads the `detection:` section (`DetectionConfig`);
classification has none. The section is validated by that class, only with its own task (a
section of another task is a config error), and handed to the task (`Task.settings`,
`ExperimentConfig.task_settings`). A plugin declares its section when it registers:

    @register_task("segmentation", settings=TaskSettings("segmentation", SegmentationConfig))
    class Segmentation(Task): ...
"""
from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel

from kdlab.registry import Registry
from kdlab.schema.detection import DetectionConfig


class TaskSettings(NamedTuple):
    """Where a task's settings live in an experiment config and which class validates them."""

    section: str
    config: type[BaseModel]


#: name -> Task class, or "module:Class" of a built-in task (see the module docstring).
TASKS: Registry[object] = Registry("task")
TASKS.add("classification", "kdlab.engine.tasks.classification:ClassificationTask")
TASKS.add("detection", "kdlab.engine.tasks.detection:DetectionTask")

#: task name -> its settings section; a task without an entry has no settings.
TASK_SETTINGS: Registry[TaskSettings] = Registry("task settings")
TASK_SETTINGS.add("detection", TaskSettings("detection", DetectionConfig))


def check_task(name: str) -> None:
    """Raise `UnknownNameError` (a `KeyError` listing the registered tasks) unless `name` is one."""
    TASKS.get(name)


def task_settings(name: str) -> TaskSettings | None:
    """The settings section of task `name`; None when it has none."""
    return TASK_SETTINGS.get(name) if name in TASK_SETTINGS else None


def settings_sections() -> dict[str, str]:
    """Every registered settings section -> the task that owns it."""
    return {TASK_SETTINGS.get(name).section: name for name in TASK_SETTINGS}


__all__ = ["TASKS", "TASK_SETTINGS", "TaskSettings", "check_task", "settings_sections", "task_settings"]
