"""Distillation methods, one file each, found by name through `METHODS`.

A method file defines a `Distiller` subclass with a `Config` (a `MethodConfig` subclass)
and registers it: `@register_method("kd")`. The experiment config's `method.name` picks it.
"""
from __future__ import annotations

import importlib
import pkgutil

from kdlab.schema.experiment import MethodConfig
from kdlab.methods.base import Distiller, StepOutput, warmup_factor
from kdlab.registry import Registry

METHODS: Registry[type[Distiller]] = Registry("method")
_loaded = False


def register_method(name: str):
    """Class decorator: register a Distiller under `name` (its Config must use that name)."""

    def decorator(cls: type[Distiller]) -> type[Distiller]:
        METHODS.add(name, cls)
        return cls

    return decorator


def _load_all() -> None:
    # Import every module in this package once, so each method registers itself.
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def method_class(name: str) -> type[Distiller]:
    _load_all()
    return METHODS.get(name)


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def list_methods() -> list[str]:
    _load_all()
    return METHODS.names()


__all__ = [
    "Distiller",
    "METHODS",
    "StepOutput",
    "list_methods",
    "method_class",
    "method_config_class",
    "register_method",
    "warmup_factor",
]
