"""Plugins: methods, models, datasets and tasks defined outside kdlab, registered by importing them.

A plugin is a Python module that registers something when it is imported
(`@register_method("sp")`, `register_dataset(...)`, ...). kdlab imports plugins from three places,
always before it validates a config, so the names they register validate like built-in ones:

- a config's `imports:` list: module names (`my_lab.methods`, found on `sys.path`) or paths to
  `.py` files, relative to the config file that lists them (`kdlab.config.loader.read_yaml`
  makes them absolute); an override `imports=[...]` is relative to the working directory;
- `--import MODULE_OR_FILE` on any command (relative to the working directory): scoped to that
  command (`command_line_imports`) and added to the `imports` of every config it validates, so
  a run trained with it records it;
- the entry-point group `kdlab.plugins` of installed distributions, loaded once
  (`load_entry_points`), so a pip-installed package needs no option at all.

A run's `config.yaml` holds the resolved list (absolute paths, module names as given), so every
command that reads the run again (eval, --resume, results, analyze, generations, reproduce)
imports the same plugins before validating it.

A plugin that fails to import is one `PluginError` naming the file and line where it failed,
never a traceback through kdlab. This module imports no heavy library (the CLI uses it before
a command runs).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import traceback
from pathlib import Path
from typing import Iterable, Iterator

from kdlab.errors import ConfigError
from kdlab.registry import import_file

log = logging.getLogger(__name__)

#: The entry-point group an installed package lists its plugin modules under
#: (`[project.entry-points."kdlab.plugins"]` in its pyproject.toml).
ENTRY_POINT_GROUP = "kdlab.plugins"

#: The end of every unknown-name message: how to register a method, model or dataset of one's own.
REGISTER_HINT = ("A {kind} defined outside kdlab is found once the module that registers it is imported: list it "
                 "in the config (imports: [my_methods.py], a path relative to the config file, or a module "
                 "name) or pass --import my_methods.py to the command (docs/methods.md, \"Your method in your "
                 "own folder\")")


class PluginError(ConfigError):
    """A plugin could not be found or failed to import."""


_imported: dict[str, object] = {}  # resolved spec -> module
_entry_points_loaded = False
_command_line: list[str] = []


def is_file_spec(spec: str) -> bool:
    """A path to a Python file (`my_methods.py`, `lib/sp.py`), not a module name."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_spec(spec: str, folder: str | Path | None = None) -> str:
    """`spec` as a config records it: a file path made absolute (relative to `folder`, default the
    working directory), a module name as given."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"imports: each entry is a module name or a path to a .py file, got {spec!r}")
    spec = spec.strip()
    if not is_file_spec(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = Path(folder if folder is not None else Path.cwd()) / path
    return str(path.resolve())


def resolve_specs(specs: object, folder: str | Path | None = None, *, where: str = "imports") -> list[str]:
    """A config's `imports` value (a list, or one string) resolved with `resolve_spec`, without repeats."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list):
        raise PluginError(f"{where} must be a list of module names or .py files, e.g. imports: [my_methods.py]; "
                          f"got a {type(specs).__name__}")
    return merge_specs([resolve_spec(s, folder) for s in specs])


def merge_specs(*lists: Iterable[str]) -> list[str]:
    """The specs of every list in order, each once."""
    return list(dict.fromkeys(s for specs in lists for s in specs))


def _failure_place(exc: BaseException, origin: str) -> str:
    """'FILE, line N' where the plugin's import failed: the innermost frame of the plugin's own
    code (its file, or for a module its package), else the innermost frame outside importlib."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}, line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    origin_dir = str(Path(origin).parent) if origin.endswith(".py") else ""
    own = [f for f in frames if f.filename == origin or (origin_dir and f.filename.startswith(origin_dir))]
    frame = (own or frames or [None])[-1]
    return "an unknown place" if frame is None else f"{frame.filename}, line {frame.lineno}"


def _failed(label: str, exc: BaseException, origin: str) -> PluginError:
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)  # a SyntaxError's str repeats the place
    first = (str(text).strip().splitlines() or [""])[0]
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return PluginError(f"plugin {label} failed to import: {reason} (at {_failure_place(exc, origin)}); fix the "
                       "plugin, or remove it from the config's imports / the --import option")


def _module_name(path: Path) -> str:
    # Named after the file, so pydantic resolves its annotations and pickle finds its classes;
    # a hash suffix when that name belongs to another module (imported or importable: a file
    # called yaml.py must not shadow the library).
    stem = path.stem if path.stem.isidentifier() else "plugin"
    taken = sys.modules.get(stem)
    if taken is not None:
        free = getattr(taken, "__file__", None) == str(path)
    else:
        try:
            found = importlib.util.find_spec(stem)
        except (ImportError, ValueError):
            found = None
        free = found is None or found.origin == str(path)
    return stem if free else f"{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist; fix the path in the config's imports "
                          "(relative to the config file) or in --import (relative to the working directory)")
    name = _module_name(path)
    if getattr(sys.modules.get(name), "__file__", None) == str(path):
        return sys.modules[name]
    try:
        return import_file(path, name)
    except Exception as exc:
        raise _failed(repr(str(path)), exc, str(path)) from None


def _import_module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(f"plugin module {name!r} is not installed or not on the Python path; install it, "
                              "add its folder to PYTHONPATH, or name its file instead (imports: [path/to/file.py])"
                              ) from None
        raise _failed(f"module {name!r}", exc, name) from None
    except Exception as exc:
        raise _failed(f"module {name!r}", exc, _origin(name)) from None


def _origin(module: str) -> str:
    """The file of `module`'s top-level package (where its import errors are looked for), else its name."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        spec = None
    return str(spec.origin) if spec is not None and spec.origin else module


def import_plugin(spec: str) -> object:
    """Import one resolved spec (`resolve_spec`) once; every failure is a `PluginError`."""
    if spec not in _imported:
        _imported[spec] = _import_file(Path(spec)) if is_file_spec(spec) else _import_module(spec)
    return _imported[spec]


def import_plugins(specs: Iterable[str], *, strict: bool = True) -> list[str]:
    """Load the entry-point plugins, then import `specs` (resolved); returns those imported.
    `strict=False` logs a failure as a warning and goes on (reading a run whose plugin is gone)."""
    load_entry_points()
    done = []
    for spec in specs:
        try:
            import_plugin(spec)
        except PluginError as exc:
            if strict:
                raise
            log.warning("%s (going on without it)", exc)
            continue
        done.append(spec)
    return done


def load_entry_points() -> None:
    """Import every plugin registered under the `kdlab.plugins` entry-point group, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", None) or "an installed package"
        try:
            ep.load()
        except Exception as exc:
            raise _failed(f"{ep.name!r} (entry point {ep.value!r} of {dist}, group {ENTRY_POINT_GROUP})", exc,
                          _origin(ep.module)) from None
    _entry_points_loaded = True  # after the loop: a broken plugin stays an error, never skipped


def reload_entry_points() -> None:
    """Forget that the entry points were loaded (tests that install or fake one)."""
    global _entry_points_loaded
    _entry_points_loaded = False


@contextlib.contextmanager
def command_line_imports(specs: Iterable[str]) -> Iterator[list[str]]:
    """`--import` for the duration of one command: import `specs` (relative to the working
    directory) now, and add them to the `imports` of every config validated inside the block."""
    resolved = resolve_specs(list(specs), where="--import")
    import_plugins(resolved)
    before = list(_command_line)
    _command_line[:] = merge_specs(_command_line, resolved)
    try:
        yield resolved
    finally:
        _command_line[:] = before


def with_command_line(specs: Iterable[str]) -> list[str]:
    """A config's resolved imports plus those of the running command's --import."""
    return merge_specs(specs, _command_line)


__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "REGISTER_HINT",
    "command_line_imports",
    "import_plugin",
    "import_plugins",
    "is_file_spec",
    "load_entry_points",
    "merge_specs",
    "reload_entry_points",
    "resolve_spec",
    "resolve_specs",
    "with_command_line",
]
