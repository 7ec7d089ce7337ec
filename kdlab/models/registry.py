"""The model registry: `create_model(name, num_classes=...)` and `list_models()`.

Zoo files register their constructors with `@register_model`. Names with a prefix
(`tv:resnet18`, `timm:convnext_tiny`) are resolved by prefix handlers that other modules
add with `register_prefix`, so external model families plug in without a rewrite.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from kdlab.registry import Registry, UnknownNameError

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a zoo constructor under its function name."""
    return MODELS.register(fn.__name__)(fn)


def register_prefix(prefix: str, factory: Callable[..., nn.Module]) -> None:
    """Route names `prefix:NAME` to `factory(NAME, num_classes=..., **kwargs)`."""
    _PREFIXES[prefix] = factory


def _constructor(name: str) -> Callable[..., nn.Module]:
    """The function that builds `name` from `num_classes=` and keyword arguments, or
    `UnknownNameError` listing the valid names or prefixes."""
    if ":" not in name:
        return MODELS.get(name)
    prefix, _, rest = name.partition(":")
    if prefix not in _PREFIXES:
        raise UnknownNameError(
            f"unknown model prefix {prefix!r} in {name!r}; known prefixes: "
            f"{', '.join(sorted(_PREFIXES)) or '(none)'}"
        )
    return functools.partial(_PREFIXES[prefix], rest)


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a model by name. Zoo names are listed by `list_models()`."""
    return _constructor(name)(num_classes=num_classes, **kwargs)


def check_model_name(name: str) -> None:
    """Raise `UnknownNameError` (listing valid names) unless `name` can be built. A prefixed
    name is checked up to its prefix: its library validates the rest when building."""
    _constructor(name)


def list_models() -> list[str]:
    """Names of the built-in zoo models."""
    return MODELS.names()
