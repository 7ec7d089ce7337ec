"""The names in an experiment config, looked up in the method, model and dataset registries.

The schema cannot import those packages (they import the schema), so config validation asks
this module instead: `REGISTRY_NAMES` is the `NameResolver` that `validate_config` passes to
`ExperimentConfig.model_validate` as its context. It selects the method's own config class
for the `method` section and a task's settings section (`kdlab.schema.tasks.TASK_SETTINGS`), and
refuses unknown model and dataset names with the registries' did-you-mean messages.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import kdlab.models  # noqa: F401  (importing the package registers the zoo and the tv:/timm:/py: prefixes)
from kdlab.config.plugins import REGISTER_HINT
from kdlab.schema.experiment import MethodConfig
from kdlab.schema.tasks import TaskSettings, check_task, settings_sections, task_settings
from kdlab.data import DATASETS
from kdlab.data.datasets import dataset_task
from kdlab.methods import method_class
from kdlab.models.registry import check_model_name
from kdlab.registry import UnknownNameError


@contextlib.contextmanager
def plugin_hint(kind: str, more: str = "") -> Iterator[None]:
    """An unknown name's message ends with how to register one from outside kdlab."""
    try:
        yield
    except UnknownNameError as exc:
        raise UnknownNameError(f"{str(exc).rstrip('.')}. {REGISTER_HINT.format(kind=kind)}{more}") from None


class RegistryNames:
    """`kdlab.schema.experiment.NameResolver` over kdlab's registries."""

    def method_config(self, name: str) -> type[MethodConfig]:
        with plugin_hint("method"):
            return method_class(name).Config

    def method_requires_teacher(self, name: str) -> bool:
        with plugin_hint("method"):
            return method_class(name).requires_teacher

    def check_model(self, name: str) -> None:
        with plugin_hint("model", "; or name a function that builds it: py:my_nets.py:make_net (docs/own-model.md)"):
            check_model_name(name)

    def check_dataset(self, name: str) -> None:
        with plugin_hint("dataset"):
            DATASETS.get(name)

    def dataset_task(self, name: str) -> str:
        return dataset_task(name)

    def check_task(self, name: str) -> None:
        with plugin_hint("task", "; a task subclasses kdlab.engine.tasks.Task and registers with register_task"):
            check_task(name)

    def task_settings(self, name: str) -> TaskSettings | None:
        return task_settings(name)

    def settings_sections(self) -> dict[str, str]:
        return settings_sections()


REGISTRY_NAMES = RegistryNames()
