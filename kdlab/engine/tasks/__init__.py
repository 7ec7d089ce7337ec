"""Tasks: what differs between kinds of training problem (see `base.Task`), found by name.

`task:` in a config names an entry of `kdlab.schema.tasks.TASKS` (checked when the config is
validated). The built-in tasks are listed there by place ("module:Class") and imported here
when a run needs one, so classification never loads the detection stack; an outside task
registers its class with `register_task`:

    @register_task("segmentation")
    class Segmentation(Task): ...
"""
from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from kdlab.errors import ConfigError
from kdlab.schema.experiment import ExperimentConfig
from kdlab.schema.tasks import TASKS
from kdlab.engine.tasks.base import Task, TaskData
from kdlab.engine.tasks.classification import ClassificationTask
from kdlab.registry import UnknownNameError

T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: register a `Task` subclass as `task: <name>`."""
    def decorator(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}) decorates a subclass of kdlab.engine.tasks.Task, not {cls!r}")
        return TASKS.register(name)(cls)

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
    """The task an experiment config trains (`task:`, classification by default)."""
    return task_class(cfg.task)()


__all__ = ["ClassificationTask", "Task", "TaskData", "register_task", "task_class", "task_for"]
