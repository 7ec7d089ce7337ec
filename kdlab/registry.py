"""Name -> factory registries with helpful errors.

Every pluggable part of kdlab (models, methods, datasets) is found by name through a
`Registry`. An unknown name raises `KeyError` subclass `UnknownNameError` that lists
the valid names and suggests the closest one, so a typo in a config is a one-line fix.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry has no entry for a name. Its message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it plainly
        return str(self.args[0]) if self.args else ""


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest string to `name` among `choices`, or None if nothing is close."""
    lowered = {c.lower(): c for c in choices}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


class Registry(Generic[T]):
    """A dict of named entries with decorator registration and did-you-mean errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def unregister(self, name: str) -> T:
        """Remove the entry `name` and return it (`UnknownNameError` if there is none)."""
        obj = self.get(name)
        del self._entries[name]
        return obj

    @contextlib.contextmanager
    def registered(self, name: str, obj: T) -> Iterator[T]:
        """Register `obj` as `name` for the duration of a `with` block (tests, temporary plugins).

        Re-entrant: if `obj` is already registered as `name`, it stays registered afterwards;
        otherwise it is removed on exit, so nothing leaks into later lookups. Registering a
        different object under a taken name is the usual `ValueError`."""
        added = name not in self._entries
        self.add(name, obj)
        try:
            yield obj
        finally:
            if added and self._entries.get(name) is obj:
                del self._entries[name]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        hint = closest(name, names)
        hint_text = f" Did you mean {hint!r}?" if hint else ""
        return f"unknown {self.kind} {name!r}.{hint_text} Valid names: {', '.join(names)}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import the Python file `path` as module `module_name`, kept in `sys.modules` (pydantic
    resolves annotations and pickle finds classes through it), so the registrations it makes run.
    A file that fails to import leaves no module behind; its error propagates."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
