"""The sweep file of `kdlab sweep` (docs/sweeps.md):

    sweep:
      name: digits_dkd_beta              # the runs go to <output_dir>/<name>/<point>_seed<seed>/
      base: ../digits/dkd.yaml           # the experiment (or a generations chain), relative to this file
      teacher: ../digits/teacher.yaml    # optional: the teacher's own config, trained first if needed
      grid: {method.beta: [1.0, 8.0]}    # dotted keys -> values (every combination) ...
      # points: [{method.alpha: 1, method.beta: 8}, ...]   # ... or the points themselves
      seeds: 2                           # train.seed, train.seed + 1, ...
      overrides: [train.epochs=3]        # key=value for every config (as on the command line)
      teacher_cache: false               # one teacher-output cache shared by every student
      metric: null                       # the figure's metric (default: the task's primary one)
    launcher: {}                         # Slurm resources for --launcher slurm (kdlab.plan.slurm)

Only the file's shape is checked here; whether the keys and values make valid experiments is
checked by `kdlab.sweep.plan`, which builds every config before anything trains.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from kdlab.config.loader import excerpt, format_validation_errors, load_yaml_mapping
from kdlab.errors import ConfigError
from kdlab.schema.experiment import StrictModel, check_run_name


class SweepSettings(StrictModel):
    """The `sweep:` block."""

    name: str = Field(description="the sweep's folder, <output_dir>/<name>: one folder name")
    base: str = Field(description="the experiment config every run starts from, relative to the sweep file")
    teacher: str | None = Field(default=None, description="the teacher's own config, relative to the sweep file: "
                                "trained into <output_dir>/<its name> first when that run is not finished")
    grid: dict[str, list[Any]] | None = Field(default=None, description="dotted key -> values; every combination")
    points: list[dict[str, Any]] | None = Field(default=None, description="the points themselves (instead of grid)")
    seeds: PositiveInt = Field(default=1, description="runs per point: train.seed, train.seed + 1, ...")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of every config")
    teacher_cache: bool = Field(default=False, description="build one teacher-output cache for every student")
    metric: str | None = Field(default=None, description="the figure's metric (default: the task's primary one)")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        check_run_name(name)
        if "/" in name:
            raise ValueError(f"{name!r} must be one folder name (no '/'), e.g. digits_dkd_beta")
        return name

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if grid is not None:
            if not grid:
                raise ValueError("is empty; give at least one key with its values, e.g. {method.beta: [1.0, 8.0]}")
            for key, values in grid.items():
                _check_key(key)
                if not values:
                    raise ValueError(f"{key} has no values; give at least one")
                if len({_fingerprint(v) for v in values}) != len(values):
                    raise ValueError(f"{key} lists a value twice ({excerpt(values)}); list each once")
        return grid

    @field_validator("points")
    @classmethod
    def _points_agree(cls, points: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if points is not None:
            if not points:
                raise ValueError("is empty; give at least one point, e.g. [{method.beta: 8.0}]")
            keys = list(points[0])
            if not keys:
                raise ValueError("the first point sets no key; every point sets the same keys")
            for key in keys:
                _check_key(key)
            for i, p in enumerate(points):
                if set(p) != set(keys):
                    raise ValueError(f"point {i + 1} sets {sorted(p)}, the first sets {sorted(keys)}; every point "
                                     "sets the same keys (the table has one column per key)")
            seen = [_fingerprint([p[k] for k in keys]) for p in points]
            if len(set(seen)) != len(seen):
                raise ValueError("lists the same point twice; list each once")
        return points

    @field_validator("overrides")
    @classmethod
    def _overrides_are_assignments(cls, overrides: list[str]) -> list[str]:
        for text in overrides:
            if "=" not in text or not text.split("=", 1)[0].strip():
                raise ValueError(f"{text!r} must look like key.subkey=value (e.g. train.epochs=5)")
        return overrides

    @model_validator(mode="after")
    def _grid_or_points(self) -> "SweepSettings":
        if (self.grid is None) == (self.points is None):
            raise ValueError("give either grid: (keys -> values, every combination) or points: (a list of "
                             "{key: value} mappings), " + ("not both" if self.grid is not None else "one of them"))
        return self


class SweepFile(StrictModel):
    sweep: SweepSettings
    launcher: dict[str, Any] = Field(default_factory=dict,
                                     description="Slurm resources for --launcher slurm (kdlab.plan.slurm)")

    @field_validator("launcher", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


def _check_key(key: str) -> None:
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts) or "=" in key:
        raise ValueError(f"key {key!r} must be a dotted config key such as method.beta")
    if parts[0] in ("name", "output_dir") or key == "train.seed":
        raise ValueError(f"{key} is set by the sweep itself (<output_dir>/<sweep name>/<point>_seed<seed>, "
                         "seeds from sweep.seeds); vary another key")


def _fingerprint(value: Any) -> str:
    """Equal for values the configs cannot tell apart (1 and 1.0 included)."""
    return repr(_normal(value))


def _normal(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------- points and labels
@dataclass(frozen=True)
class Point:
    """One setting of the varied keys: `values` (key -> value, in the sweep's key order) and the
    `label` its run folders are named after (`beta8`, `alpha1_beta8`)."""

    label: str
    values: dict[str, Any] = field(hash=False)


def format_value(value: Any) -> str:
    """A value as a short label part: 8.0 -> '8', 0.5 -> '0.5', 1e-4 -> '0.0001', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        short = format(value, "g")
        text = short if float(short) == value else repr(value)
        return text.replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{format_value(v)}" for k, v in value.items())
    return str(value)


def key_titles(keys: list[str]) -> dict[str, str]:
    """Each key's name in labels and table headers: its last segment (`method.beta` -> `beta`),
    or the whole key with '.' -> '-' when two keys share their last segment."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last)}


def point_label(values: dict[str, Any], titles: dict[str, str]) -> str:
    """`{'method.alpha': 1.0, 'method.beta': 8.0}` -> `alpha1_beta8` (a folder name)."""
    text = "_".join(f"{titles[k]}{format_value(v)}" for k, v in values.items())
    for bad, good in (("/", "-"), ("\\", "-"), (":", "-"), (" ", "")):  # a portable folder name
        text = text.replace(bad, good)
    return text or "point"


def expand_points(settings: SweepSettings) -> list[dict[str, Any]]:
    """The points: every combination of the grid (the last key varying fastest), or the list."""
    if settings.grid is not None:
        keys = list(settings.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(settings.grid[k] for k in keys))]
    assert settings.points is not None
    keys = list(settings.points[0])
    return [{k: p[k] for k in keys} for p in settings.points]


# ------------------------------------------------------------------------------ the sweep
@dataclass
class Sweep:
    """A read sweep file: its settings, its files resolved, its points labelled."""

    path: Path
    settings: SweepSettings
    base: Path
    teacher: Path | None
    keys: list[str]
    points: list[Point]
    launcher: dict[str, Any]

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def seeds(self) -> int:
        return self.settings.seeds


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem is one `ConfigError` naming the file."""
    path = Path(path)
    data, _ = load_yaml_mapping(path, kind="sweep file", shape="a mapping with 'sweep:' (and 'launcher:')")
    try:
        parsed = SweepFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc, SweepFile, data, title=f"invalid sweep file {path}")) from None
    s = parsed.sweep
    base = path.parent / s.base
    if not base.is_file():
        raise ConfigError(f"{path}: sweep.base {s.base!r} does not exist ({base}); name the experiment config "
                          "relative to the sweep file")
    teacher = None
    if s.teacher is not None:
        teacher = path.parent / s.teacher
        if not teacher.is_file():
            raise ConfigError(f"{path}: sweep.teacher {s.teacher!r} does not exist ({teacher}); name the teacher's "
                              "config relative to the sweep file, or remove sweep.teacher")
    values = expand_points(s)
    keys = list(values[0])
    titles = key_titles(keys)
    points = [Point(point_label(v, titles), v) for v in values]
    labels = [p.label for p in points]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise ConfigError(f"{path}: two points get the same run-folder label {label!r} "
                              f"({points[labels.index(label)].values} and {points[i].values}); make their values "
                              "differ in their short form")
        try:
            check_run_name(f"{label}_seed0")
        except ValueError as exc:
            raise ConfigError(f"{path}: point {points[i].values} cannot name a run folder: {exc}") from None
    return Sweep(path=path, settings=s, base=base, teacher=teacher, keys=keys, points=points, launcher=parsed.launcher)


__all__ = ["Point", "Sweep", "SweepFile", "SweepSettings", "expand_points", "format_value", "key_titles",
           "load_sweep", "point_label"]
