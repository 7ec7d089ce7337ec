"""Load, merge, override and validate experiment configs.

YAML is parsed with PyYAML's safe loader only: a config is data and never executes code.
A key written twice in one mapping is an error naming both lines (PyYAML would keep the last
silently), and so are aliases that expand to more than `MAX_EXPANDED` values (an alias bomb);
error messages quote at most a short excerpt of a value (`excerpt`).
A config may name `base:` files (relative to itself) that it extends; dotted command-line
overrides (`train.epochs=5 method.beta=8`) apply last; `method.name=X` over a file whose method is
another starts X's section from X's defaults (the file's method keys are dropped, with a log note).
A config's `imports:` (plugins, `kdlab.config.plugins`) are resolved relative to the file that lists
them, accumulate over its base files, and are imported before validation. Any validation problem becomes one
`ConfigError` whose message names each offending key, what is wrong, and the closest valid
key when a name is misspelt.
"""
from __future__ import annotations

import copy
import logging
import reprlib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from kdlab.config.plugins import import_plugins, merge_specs, resolve_specs, with_command_line
from kdlab.schema.experiment import ExperimentConfig, MethodConfig
from kdlab.errors import ConfigError
from kdlab.registry import UnknownNameError, closest

log = logging.getLogger(__name__)


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


#: More values than this once aliases are expanded, and a YAML file is refused: configs hold
#: hundreds; a few nested aliases can expand to billions, which validating, copying or
#: quoting in a message would try to build.
MAX_EXPANDED = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxdict, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 4, 4, 60, 60


def excerpt(value: Any, limit: int = 120) -> str:
    """A repr of `value` of at most about `limit` characters, computed without building the
    whole repr (a value may be huge: a long string, a list of a million items)."""
    text = _EXCERPT.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_nodes(root: yaml.Node, where: Path) -> None:
    """Refuse duplicate keys and alias bombs in a composed YAML document, before it is built.

    Walks the node graph once (an alias is the same node object again), counting what the
    document expands to."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{where}: an alias (*name) refers to the value that contains it; a config "
                              "cannot be recursive")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            _check_keys(node, where)
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v) for v in node.value)
        open_nodes.discard(key)
        if total > MAX_EXPANDED:
            raise ConfigError(f"{where}: its aliases (*name) expand to more than {MAX_EXPANDED:,} values "
                              f"(line {node.start_mark.line + 1}); a config never needs this many: write the "
                              "values out, or use fewer nested aliases")
        sizes[key] = total
        return total

    size(root)


def _check_keys(node: yaml.MappingNode, where: Path) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        # Merge keys (<<: *defaults) are meant to be overridden by the mapping's own keys.
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        first = seen.get((key.tag, key.value))
        if first is not None:
            lines = f"lines {first} and {line}" if first != line else f"line {line}, twice"
            raise ConfigError(f"{where}: key {excerpt(key.value)} appears twice in one mapping ({lines}); the "
                              "second would silently replace the first: keep one (merge their contents)")
        seen[(key.tag, key.value)] = line


def parse_yaml(text: str, where: Path) -> Any:
    """The data of one YAML document (safe: plain data only), with duplicate keys and alias
    bombs refused as `ConfigError`s; `where` names the file in messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read; a config is a few levels of sections") from None
    finally:
        loader.dispose()


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
        data = parse_yaml(read_text_file(path, kind), path) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {shape}, got {type(data).__name__}")
    return data, resolved


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file and the `base:` files it extends, merged (the file wins); `imports`
    accumulate instead (the bases' first), each made absolute relative to the file naming it."""
    path = Path(path)
    data, resolved = load_yaml_mapping(path, _seen)
    given = data.pop("base", None)
    bases = [] if given is None else [given] if isinstance(given, str) else given
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file path or a list of file paths, relative to this file "
                          f"(base: ../common.yaml, or base: [a.yaml, b.yaml]); got {excerpt(given)}")
    own_imports = resolve_specs(data.pop("imports", None), path.parent, where=f"{path}: imports")
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml(path.parent / b, _seen + (resolved,)))
    out = deep_merge(merged, data)
    imports = merge_specs(merged.get("imports", []), own_imports)
    if imports:
        out["imports"] = imports
    return out


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


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(overrides for every config, overrides for the students' own config only: method.*,
    teacher.*, name): how `reproduce` and `sweep` route the command line between a student's
    config and its teacher's."""
    shared, own = [], []
    for text in overrides:
        (own if override_section(text) in ("method", "teacher", "name") else shared).append(text)
    return shared, own


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """`data` with dotted overrides applied in order. `method.name=X` naming another method than
    `data`'s starts X's section from X's defaults: the keys `data` gave its own method are dropped
    first (logged), so `kd.yaml method.name=dkd method.beta=8` is dkd with beta 8."""
    overrides = list(overrides)
    out = _switch_method(copy.deepcopy(data), overrides)
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


def _switch_method(data: dict, overrides: list[str]) -> dict:
    # The base's keys belong to its method's config class; another method's class would refuse
    # them as unknown keys (kd's temperature is not sp's), so they cannot carry over.
    method = data.get("method")
    if not isinstance(method, dict):
        return data
    for text in overrides:
        parts, value = parse_override(text)
        if parts != ["method", "name"] or value == method.get("name", "vanilla"):
            continue
        dropped = sorted(k for k in method if k != "name")
        if dropped:
            log.info("method.name=%s replaces the config's method %r: its keys %s are dropped (%s starts from "
                     "its defaults; set its own keys with method.KEY=VALUE)", value,
                     method.get("name", "vanilla"), ", ".join(dropped), value)
        data["method"] = {"name": method.get("name", "vanilla")}
        return data
    return data


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
            # lazy: the registries import torch and every model; reading a run folder needs neither
            from kdlab.config.resolve import REGISTRY_NAMES

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
            got_text = "" if isinstance(got, dict) else f" (got {excerpt(got)})"
            msg = f"{key}: {text}{got_text}"
        lines.append(msg)
    return f"{title}:\n  - " + "\n  - ".join(lines)


def validate_config(data: dict, *, plugins_required: bool = True) -> ExperimentConfig:
    """Validate a raw mapping; raise one `ConfigError` listing every problem.

    First imports the plugins: the installed entry points, the config's `imports` (a path not yet
    absolute is relative to the working directory) and those of the command's --import, which
    join the validated config's `imports`. `plugins_required=False`: a plugin that fails to import
    is a logged warning (reading a run whose plugin is gone, when what it registered is not needed)."""
    # lazy: the registries import torch and every model (kdlab results reads configs without them)
    from kdlab.config.resolve import REGISTRY_NAMES

    if isinstance(data, dict):
        imports = with_command_line(resolve_specs(data.get("imports")))
        import_plugins(imports, strict=plugins_required)
        data = {**data, "imports": imports}
    try:
        return ExperimentConfig.model_validate(data, context=REGISTRY_NAMES)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc, ExperimentConfig, data)) from None
    except UnknownNameError as exc:
        raise ConfigError(f"invalid config: {exc}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), data: dict | None = None, *,
                imports: Iterable[str] = (), plugins_required: bool = True) -> ExperimentConfig:
    """Read `path` (with its `base:` files), apply dotted overrides, validate. `imports`: more
    plugins (resolved specs) to import and record in the config's `imports`, such as those a
    resumed run's config.yaml lists (`kdlab train --resume` without repeating its --import).
    `plugins_required`: as in `validate_config`."""
    raw = apply_overrides(read_yaml(path) if path is not None else copy.deepcopy(data or {}), overrides)
    if imports:
        raw["imports"] = merge_specs(resolve_specs(raw.get("imports")), imports)
    return validate_config(raw, plugins_required=plugins_required)


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
    "excerpt",
    "format_validation_errors",
    "load_config",
    "load_yaml_mapping",
    "override_section",
    "parse_yaml",
    "read_yaml",
    "split_overrides",
    "validate_config",
]
