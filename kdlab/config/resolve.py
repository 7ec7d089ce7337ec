"""The names in an experiment config, looked up in the method, model and dataset registries.

The schema cannot import those packages (they import the schema), so config validation asks
this module instead: `REGISTRY_NAMES` is the `NameResolver` that `validate_config` passes to
`ExperimentConfig.model_validate` as its context. It selects the method's own config class
for the `method` section and refuses unknown model and dataset names with the registries'
did-you-mean messages.
"""
from __future__ import annotations

import kdlab.models  # noqa: F401  (importing the package registers the zoo and the tv:/timm:/py: prefixes)
from kdlab.schema.experiment import MethodConfig
from kdlab.data import DATASETS
from kdlab.methods import method_class
from kdlab.models.registry import check_model_name


class RegistryNames:
    """`kdlab.schema.experiment.NameResolver` over kdlab's registries."""

    def method_config(self, name: str) -> type[MethodConfig]:
        return method_class(name).Config

    def method_requires_teacher(self, name: str) -> bool:
        return method_class(name).requires_teacher

    def check_model(self, name: str) -> None:
        check_model_name(name)

    def check_dataset(self, name: str) -> None:
        DATASETS.get(name)


REGISTRY_NAMES = RegistryNames()
