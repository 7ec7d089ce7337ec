"""Load, merge, override and validate experiment configs.

YAML is parsed with `yaml.safe_load` only: a config is data and never executes code.
A config may name `base:` files (relative to itself) that it extends; dotted command-line
overrides (`train.epochs=5 method.beta=8`) apply last. Any validation problem becomes one
`ConfigError` whose message names each offending key, what is wrong, and the closest valid
key when a name is misspelt.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from kdlab.config.schema import ExperimentConfig, MethodConfig
from kdlab.errors import ConfigError
from kdlab.registry import UnknownNameError, closest


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (override wins; dicts merge)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_mapping(path: str | Path, _seen: tuple[Path, ...] = (), *, kind: str = "config",
                      shape: str = "a mapping of sections") -> tuple[dict, Path]:
    """Parse one YAML file that must hold a mapping; every failure is one `ConfigError`.

    `_seen` holds the resolved paths of the files that led here through `base:`, so a
    loop is reported instead of recursing forever. Returns the mapping and the resolved path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {str(path)!r} does not exist; pass the path to a YAML file")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{kind} 'base:' chain loops back to {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {shape}, got {type(data).__name__}")
    return data, resolved


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file and the `base:` files it extends, merged (the file wins)."""
    path = Path(path)
    data, resolved = load_yaml_mapping(path, _seen)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml(path.parent / b, _seen + (resolved,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value (e.g. train.epochs=5)")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {text!r}: {p!r} is a value, not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def _section_class(loc: tuple, data: dict) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc` (for did-you-mean suggestions)."""
    from kdlab.methods import method_config_class

    cls: type[BaseModel] | None = ExperimentConfig
    for i, part in enumerate(loc[:-1]):
        if cls is None:
            return None
        if cls is ExperimentConfig and part == "method":
            method = data.get("method")
            name = method.get("name", "vanilla") if isinstance(method, dict) else method or "vanilla"
            try:
                cls = method_config_class(str(name))
            except UnknownNameError:
                return None
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return cls


def _format_errors(exc: ValidationError, data: dict) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(config)"
        if err["type"] == "extra_forbidden":
            cls = _section_class(loc, data)
            valid = sorted(cls.model_fields) if cls is not None else []
            hint = closest(str(loc[-1]), valid) if valid else None
            msg = f"unknown key {key!r}"
            if hint:
                msg += f"; did you mean {'.'.join(map(str, loc[:-1] + (hint,)))!r}?"
            if valid:
                msg += f" Valid keys here: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = f"missing required key {key!r}"
        else:
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, "):]
            got = err.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{key}: {text}{got_text}"
        lines.append(msg)
    return "invalid config:\n  - " + "\n  - ".join(lines)


def validate_config(data: dict) -> ExperimentConfig:
    """Validate a raw mapping; raise one `ConfigError` listing every problem."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data)) from None
    except UnknownNameError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), data: dict | None = None) -> ExperimentConfig:
    """Read `path` (with its `base:` files), apply dotted overrides, validate."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    return validate_config(apply_overrides(raw, overrides))


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain-data form of a config, suitable for YAML (round-trips through load_config)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "ExperimentConfig",
    "MethodConfig",
    "apply_overrides",
    "config_to_dict",
    "deep_merge",
    "dump_config",
    "load_config",
    "read_yaml",
    "validate_config",
]
