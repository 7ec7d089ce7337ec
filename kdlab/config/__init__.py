"""Experiment configs: typed schema (`schema.py`) and YAML loading (`loader.py`)."""
from kdlab.config.loader import (
    apply_overrides,
    config_to_dict,
    deep_merge,
    dump_config,
    load_config,
    read_yaml,
    validate_config,
)
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
