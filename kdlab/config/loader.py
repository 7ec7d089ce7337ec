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

from kdlab.config.resolve import REGISTRY_NAMES
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


def read_text_file(path: Path, kind: str = "config") -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is allowed); anything else is one
    `ConfigError` naming the file, instead of a `UnicodeDecodeError` traceback."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{kind} file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ConfigError(
            f"{kind} file {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}"
            + ("; it looks like UTF-16" if utf16 else "") + "); save it as UTF-8"
        ) from None


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
        data = yaml.safe_load(read_text_file(path, kind)) or {}
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


def override_section(text: str) -> str:
    """The top-level key a `key.subkey=value` override sets ('key'); routes overrides between configs."""
    return text.split("=", 1)[0].strip().split(".", 1)[0]


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


def _section_class(loc: tuple, data: Any, model: type[BaseModel]) -> type[BaseModel] | None:
    """The schema class that owns the key at `loc` (for did-you-mean suggestions).

    Walks the field annotations from `model`; a field typed as the `MethodConfig` base
    resolves to the config class its `name` selects in `data` (method sections are open-ended).
    """
    cls: type[BaseModel] | None = model
    node = data
    for part in loc[:-1]:
        if cls is None:
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is MethodConfig:
            name = node.get("name", "vanilla") if isinstance(node, dict) else node or "vanilla"
            try:
                cls = REGISTRY_NAMES.method_config(str(name))
            except UnknownNameError:
                return None
    return cls


def format_validation_errors(exc: ValidationError, model: type[BaseModel], data: Any, *,
                             title: str = "invalid config", missing_hints: dict[str, str] | None = None) -> str:
    """One message listing every problem of `exc` (raised validating `data` as `model`): each
    offending key, what is wrong, and for a misspelt key the closest valid one.

    `missing_hints` adds an explanation after 'missing required key K' for chosen keys K.
    """
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(config)"
        if err["type"] == "extra_forbidden":
            cls = _section_class(loc, data, model)
            valid = sorted(cls.model_fields) if cls is not None else []
            hint = closest(str(loc[-1]), valid) if valid else None
            msg = f"unknown key {key!r}"
            if hint:
                msg += f"; did you mean {'.'.join(map(str, loc[:-1] + (hint,)))!r}?"
            if valid:
                msg += f" Valid keys here: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = f"missing required key {key!r}" + (missing_hints or {}).get(key, "")
        else:
            text = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            got = err.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{key}: {text}{got_text}"
        lines.append(msg)
    return f"{title}:\n  - " + "\n  - ".join(lines)


def validate_config(data: dict) -> ExperimentConfig:
    """Validate a raw mapping; raise one `ConfigError` listing every problem."""
    try:
        return ExperimentConfig.model_validate(data, context=REGISTRY_NAMES)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc, ExperimentConfig, data)) from None
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
    "format_validation_errors",
    "load_config",
    "load_yaml_mapping",
    "override_section",
    "read_yaml",
    "validate_config",
]
