"""The names `task:` accepts: the registry of tasks, kept in the schema layer so that config
validation refuses an unknown task before anything runs.

A task's code (`kdlab.engine.tasks`: data, networks, batches, metrics, `primary_metric`) sits
in the engine, above the config layer, so the schema cannot import it. `TASKS` therefore maps
a name either to the task class itself (a plugin's `kdlab.engine.tasks.register_task`) or to
where the class is, as "module:Class" (the built-in tasks: the engine imports that module when
a run needs it, so validating a classification config never loads torchvision's detectors).
"""
from __future__ import annotations

from kdlab.registry import Registry

#: name -> Task class, or "module:Class" of a built-in task (see the module docstring).
TASKS: Registry[object] = Registry("task")
TASKS.add("classification", "kdlab.engine.tasks.classification:ClassificationTask")
TASKS.add("detection", "kdlab.engine.tasks.detection:DetectionTask")


def check_task(name: str) -> None:
    """Raise `UnknownNameError` (a `KeyError` listing the registered tasks) unless `name` is one."""
    TASKS.get(name)


__all__ = ["TASKS", "check_task"]
