"""Tasks: what differs between kinds of training problem (see `base.Task`), found by name.

`task:` in a config names an entry of `kdlab.schema.tasks.TASKS` (checked when the config is
validated). The built-in tasks are listed there by place ("module:Class") and imported here
when a run needs one, so classification never loads the detection stack; an outside task
registers its class with `register_task`, and with it the settings section it owns (a pydantic
model; validated with the config, refused under another task, and handed to the task as
`Task.settings`):

    @register_task("segmentation", settings=TaskSettings("segmentation", SegmentationConfig))
    class Segmentation(Task): ...
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from kdlab.errors import ConfigError
from kdlab.schema.experiment import ExperimentConfig
from kdlab.schema.tasks import TASK_SETTINGS, TASKS, TaskSettings, task_settings
from kdlab.engine.tasks.base import Task, TaskData
from kdlab.engine.tasks.classification import ClassificationTask
from kdlab.registry import UnknownNameError

T = TypeVar("T", bound=type[Task])


def register_task(name: str, settings: TaskSettings | None = None) -> Callable[[T], T]:
    """Class decorator: register a `Task` subclass as `task: <name>`, owning the config section
    `settings.section` validated by `settings.config` (none: the task has no settings)."""
    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) decorates a subclass of kdlab.engine.tasks.Task, not {cls!r}")
        TASKS.register(name)(cls)
        spec = TaskSettings(*settings) if settings is not None else None
        if spec is not None and task_settings(name) != spec:  # an equal entry: the module imported again
            TASK_SETTINGS.add(name, spec)
        return cls

    return decorator


def task_class(name: str) -> type[Task]:
    """The Task class registered as `name` (a built-in one is imported now)."""
    try:
        entry = TASKS.get(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{exc}; set task: to one of these, or register yours with "
                          "kdlab.engine.tasks.register_task") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry  # type: ignore[return-value]


def task_for(cfg: ExperimentConfig) -> Task:
    """The task an experiment config trains (`task:`, classification by default), holding its
    settings section as `settings` (the section's defaults when the config leaves it out)."""
    task = task_class(cfg.task)()
    spec = task_settings(cfg.task)
    task.settings = cfg.task_settings if cfg.task_settings is not None or spec is None else spec.config()
    return task


__all__ = ["ClassificationTask", "Task", "TaskData", "TaskSettings", "register_task", "task_class", "task_for"]
