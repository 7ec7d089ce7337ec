"""Experiment configs as files: YAML reading, base files, overrides, and validation of the
names a config uses against kdlab's registries (`resolve`).

This package sits above the method, model and dataset packages, whose registries it asks; the
schema it validates against is `kdlab.schema`, the bottom layer those packages build on.
"""
from __future__ import annotations

from kdlab.config.loader import (
    apply_overrides,
    config_to_dict,
    deep_merge,
    dump_config,
    load_config,
    read_yaml,
    validate_config,
)

__all__ = [
    "apply_overrides",
    "config_to_dict",
    "deep_merge",
    "dump_config",
    "load_config",
    "read_yaml",
    "validate_config",
]
