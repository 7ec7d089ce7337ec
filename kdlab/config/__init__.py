"""Experiment configs: typed schema (`schema.py`) and YAML loading (`loader.py`).

The schema is imported eagerly; the loader's names load on first use (PEP 562). The loader
resolves method names through `kdlab.methods`, whose modules import `kdlab.config.schema`;
importing the schema (which runs this file) must therefore not import the loader.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdlab.config.schema import (
    DataConfig,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    StrictModel,
    TrainConfig,
)

if TYPE_CHECKING:
    from kdlab.config.loader import (
        apply_overrides,
        config_to_dict,
        deep_merge,
        dump_config,
        load_config,
        read_yaml,
        validate_config,
    )

_LOADER_NAMES = frozenset({
    "apply_overrides", "config_to_dict", "deep_merge", "dump_config", "load_config", "read_yaml", "validate_config",
})


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        # lazy: importing the schema must not import the loader (see the docstring above)
        from kdlab.config import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'kdlab.config' has no attribute {name!r}")


__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "deep_merge",
    "dump_config",
    "load_config",
    "read_yaml",
    "validate_config",
]
