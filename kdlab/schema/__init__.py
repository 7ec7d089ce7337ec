"""The typed experiment schema: what a config may say, checked by pydantic, and nothing else.

This package is the bottom layer of kdlab's configs. It imports no registry: the method,
model, dataset and engine packages build on it, and the names a config uses are resolved one
layer up, in `kdlab.config` (which reads YAML, applies overrides and validates against the
registries). Modules: `experiment` (the sections of an experiment), `detection` (the
`detection:` section), `compare` (the one definition of "the same experiment"), `tasks` (the
registry of task names: the one registry kept here, since the tasks' code sits in the engine,
above every layer that validates configs).
"""
from __future__ import annotations

from kdlab.schema.experiment import (
    DataConfig,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "StrictModel",
    "TrainConfig",
]
