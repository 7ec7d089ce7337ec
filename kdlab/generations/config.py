"""The chain config of `kdlab generations`: one file, one chain (Yang et al., arXiv 1805.05551).

    experiment:   # a normal experiment config (model, data, optim, schedule, train; no method
      ...         # or teacher: the chain sets those per generation). May name `base:` files.
    chain:        # ChainSettings
      notation: "D(0.6, 0.6)"   # sets patriarch.eta and lam
      generations: 5
      patriarch:                # generation 0's loss: the `tolerant` method's own config
        k: 5

Generation 0 (the patriarch) trains with method `tolerant` and the `chain.patriarch` block as
its method config (`kdlab.methods.tolerant.TolerantConfig`: kind, eta, k, scores, primary,
smoothing, penalty); generation m >= 1 with method `generation` (lam, tau), taught by generation
m - 1's `best.pt` or `last.pt` (`chain.checkpoint`). Runs go to
`<output_dir>/<experiment.name>/gen<m>/`, each a normal run folder.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, ValidationError, model_validator

from kdlab.config.loader import (
    apply_overrides, deep_merge, format_validation_errors, load_yaml_mapping, override_section, read_yaml,
    validate_config,
)
from kdlab.config.plugins import merge_specs, resolve_specs
from kdlab.schema.experiment import ExperimentConfig, StrictModel
from kdlab.engine.run_folder import RunFolder
from kdlab.errors import ConfigError
from kdlab.methods.tolerant import TolerantConfig

_NOTATION = re.compile(r"^\s*D\s*\(\s*([0-9]*\.?[0-9]+)\s*,\s*([0-9]*\.?[0-9]+)\s*\)\s*$")


def parse_notation(text: str) -> tuple[float, float]:
    """'D(0.6, 0.6)' -> (eta, lam). ValueError for anything else."""
    m = _NOTATION.match(text)
    if not m:
        raise ValueError(f"notation {text!r} must look like 'D(eta, lambda)', e.g. 'D(0.6, 0.6)'")
    return float(m.group(1)), float(m.group(2))


def _lam_text(lam: float | list[float]) -> str:
    lams = lam if isinstance(lam, list) else [lam]
    if len(set(lams)) <= 1:
        return f"{lams[0] if lams else 0.0:.1f}"
    return "/".join(f"{x:g}" for x in lams)


def format_notation(eta: float, lam: float | list[float]) -> str:
    """The paper's D(eta, lambda) label; per-generation lambdas are joined with '/'."""
    return f"D({eta:.1f}, {_lam_text(lam)})"


# The patriarch's settings live in its own block; these names at chain level are a mistake
# worth one precise message (chains written before the block existed had them there).
_PATRIARCH_KEYS = set(TolerantConfig.model_fields) - {"name"}


class ChainSettings(StrictModel):
    """The `chain:` block. Every value the paper leaves open is a setting (docs/tolerant.md)."""

    notation: str | None = Field(default=None, description="the paper's D(eta, lambda); sets patriarch.eta and lam")
    patriarch: TolerantConfig = Field(
        default_factory=TolerantConfig,
        description="generation 0's loss: the tolerant method's config (kind, eta, k, scores, primary, "
                    "smoothing, penalty); kind defaults to strict when eta = 1, else tsd")
    lam: float | list[float] | None = Field(
        default=None, description="teacher weight of generations >= 1 (default 0.6), or one per generation")
    tau: PositiveFloat = Field(default=1.0, description="temperature of the teacher term")
    generations: NonNegativeInt = Field(default=5, description="number of generations after the patriarch")
    checkpoint: Literal["best", "last"] = Field(
        default="last", description="which checkpoint of generation m teaches m + 1 (and is evaluated)")
    seed_offset: int = Field(default=1, description="generation m trains with seed train.seed + m * seed_offset")
    groups: list[int] | dict[str, list[str | int]] | str | None = Field(
        default=None, description="class -> group mapping for the secondary metrics (default: CIFAR-100 coarse)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_notation(cls, data: Any) -> Any:
        # Resolve eta / lam / kind before field validation so that every later check (and the
        # saved chain.yaml) sees concrete values.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        misplaced = sorted(_PATRIARCH_KEYS & set(data))
        if misplaced:
            key = misplaced[0]
            raise ValueError(f"chain.{key} is a setting of the patriarch: write it as chain.patriarch.{key} "
                             f"(the patriarch block is the tolerant method's config)")
        patriarch = data.get("patriarch")
        if patriarch is None:
            patriarch = {}
        if not isinstance(patriarch, dict):
            return data  # a wrong type: the field's own error names it
        patriarch = dict(patriarch)
        eta = patriarch.get("eta")
        if data.get("notation") is not None:
            n_eta, n_lam = parse_notation(str(data["notation"]))
            if eta is not None and float(eta) != n_eta:
                raise ValueError(f"notation {data['notation']!r} says eta={n_eta:g} but chain.patriarch.eta={eta}; "
                                 "make them agree or drop one")
            lam = data.get("lam")
            if lam is not None and any(float(x) != n_lam for x in (lam if isinstance(lam, list) else [lam])):
                raise ValueError(f"notation {data['notation']!r} says lam={n_lam:g} but chain.lam={lam}; "
                                 "make them agree or drop one")
            eta = n_eta if eta is None else eta
            if lam is None:
                data["lam"] = n_lam
        kind = patriarch.get("kind")
        if kind is None and eta is not None:
            kind = "strict" if float(eta) == 1.0 else "tsd"
        if kind is not None:
            patriarch["kind"] = kind
        if eta is None and kind not in (None, "tsd"):
            eta = 1.0  # the D(eta, lam) of a patriarch without the TSD term
        if eta is not None:
            patriarch["eta"] = eta
        data["patriarch"] = patriarch
        if data.get("lam") is None:
            data["lam"] = 0.6
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ChainSettings":
        p = self.patriarch
        if p.kind != "tsd" and p.eta != 1.0:
            raise ValueError(
                f"chain.patriarch.eta={p.eta} only applies to kind 'tsd' (the {p.kind} patriarch has eta = 1); "
                "set chain.patriarch.kind: tsd or drop chain.patriarch.eta"
            )
        assert self.lam is not None
        lams = self.lam if isinstance(self.lam, list) else [self.lam]
        if any(not 0.0 <= x <= 1.0 for x in lams):
            raise ValueError(f"chain.lam must be in [0, 1], got {self.lam}")
        if isinstance(self.lam, list) and len(self.lam) != self.generations:
            raise ValueError(f"chain.lam lists {len(self.lam)} values for {self.generations} generations; "
                             "give one per generation or a single number")
        if self.generations and all(x == 0.0 for x in lams) and self.seed_offset == 0:
            raise ValueError("with lam = 0 and seed_offset = 0 every generation would be an identical copy "
                             "of the patriarch; set chain.seed_offset: 1")
        return self

    def lam_of(self, m: int) -> float:
        """lambda of generation m >= 1."""
        return float(self.lam[m - 1] if isinstance(self.lam, list) else self.lam)  # type: ignore[index]

    @property
    def label(self) -> str:
        """D(eta, lambda) for strict/tsd patriarchs; e.g. 'LS(0.1), lam 0.6' for the others."""
        lam = self.lam if self.lam is not None else 0.6
        p = self.patriarch
        if p.kind in ("strict", "tsd"):
            return format_notation(p.eta, lam)
        soft = f"LS({p.smoothing:g})" if p.kind == "label_smoothing" else f"CP({p.penalty:g})"
        return f"{soft}, lam {_lam_text(lam)}"


class ChainFile(StrictModel):
    experiment: dict[str, Any]
    chain: ChainSettings = Field(default_factory=ChainSettings)


@dataclass
class Chain:
    """A validated chain: settings, the per-generation experiment configs and where they run."""

    name: str
    root: Path
    settings: ChainSettings
    configs: list[ExperimentConfig]
    raw: dict[str, Any]

    def run_dir(self, m: int) -> Path:
        return self.root / f"gen{m}"

    def folder(self, m: int) -> RunFolder:
        return RunFolder(self.run_dir(m))

    def checkpoint(self, m: int) -> Path:
        """The checkpoint of generation m that teaches m + 1 (and that the report evaluates)."""
        return self.folder(m).checkpoint(self.settings.checkpoint)

    def finished_generations(self) -> list[int]:
        """Generations 0..m-1 that are finished (result.json and the handed-on checkpoint), in
        order, stopping at the first unfinished one."""
        out = []
        for m in range(len(self.configs)):
            if not self.folder(m).is_finished() or not self.checkpoint(m).is_file():
                break
            out.append(m)
        return out


# ---------------------------------------------------------------------------- loading
_EXPERIMENT_KEYS = set(ExperimentConfig.model_fields) - {"method", "teacher"}


def read_chain_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a chain file with its top-level `base:` files and `experiment.base:` files, each
    resolved relative to the file that names it (the file wins over its bases)."""
    path = Path(path)
    data, resolved = load_yaml_mapping(path, _seen, kind="chain config",
                                       shape="a mapping with 'experiment:' and 'chain:'")
    bases = data.pop("base", None) or []
    exp = data.get("experiment")
    if isinstance(exp, dict) and "imports" in exp:  # plugins: relative to this file, as in read_yaml
        exp["imports"] = resolve_specs(exp["imports"], path.parent, where=f"{path}: experiment.imports")
    if isinstance(exp, dict) and exp.get("base"):
        ebases = exp.pop("base")
        merged_exp: dict = {}
        for b in [ebases] if isinstance(ebases, str) else ebases:
            merged_exp = deep_merge(merged_exp, read_yaml(path.parent / b))
        data["experiment"] = deep_merge(merged_exp, exp)
        imports = merge_specs(merged_exp.get("imports", []), exp.get("imports", []))
        if imports:
            data["experiment"]["imports"] = imports
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_chain_yaml(path.parent / b, _seen + (resolved,)))
    return deep_merge(merged, data)


def is_chain_file(path: str | Path) -> bool:
    """A chain config has a top-level `experiment:` block (an experiment config never has)."""
    try:
        data, _ = load_yaml_mapping(path, kind="config")
    except ConfigError:
        return False
    return "experiment" in data


def route_overrides(overrides: Iterable[str]) -> list[str]:
    """Let `train.epochs=2` mean `experiment.train.epochs=2` (chain settings need `chain.`)."""
    return [f"experiment.{text.strip()}" if override_section(text) in _EXPERIMENT_KEYS else text
            for text in overrides]


def generation_dict(experiment: dict, settings: ChainSettings, m: int, root: Path) -> dict:
    """The raw experiment config of generation m (validated by the caller)."""
    raw = copy.deepcopy(experiment)
    raw["name"] = f"gen{m}"
    raw["output_dir"] = str(root)
    train = raw.setdefault("train", {}) or {}
    raw["train"] = train
    train["seed"] = int(train.get("seed", 0)) + m * settings.seed_offset
    if m == 0:
        raw["method"] = settings.patriarch.model_dump(mode="json")
    else:
        raw["method"] = {"name": "generation", "lam": settings.lam_of(m), "tau": settings.tau}
        model = raw.get("model") or {}
        raw["teacher"] = {
            "name": model.get("name"),
            "kwargs": copy.deepcopy(model.get("kwargs", {})),
            "checkpoint": str(root / f"gen{m - 1}" / f"{settings.checkpoint}.pt"),
        }
    return raw


_MISSING_EXPERIMENT = " (the experiment every generation trains: model, data, optim, schedule, train)"


def load_chain(path: str | Path | None = None, overrides: Iterable[str] = (), data: dict | None = None) -> Chain:
    """Read (or take) a chain config, apply dotted overrides, validate it and every generation."""
    raw = read_chain_yaml(path) if path is not None else copy.deepcopy(data or {})
    raw = apply_overrides(raw, route_overrides(overrides))
    try:
        parsed = ChainFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(exc, ChainFile, raw, title="invalid chain config",
                                                   missing_hints={"experiment": _MISSING_EXPERIMENT})) from None
    exp = parsed.experiment
    for key in ("method", "teacher"):
        if exp.get(key) is not None:
            raise ConfigError(
                f"invalid chain config: experiment.{key} is set, but the chain chooses each generation's "
                f"{key} itself (patriarch: chain.patriarch, students: chain.lam/tau); remove experiment.{key}"
            )
    if (exp.get("model") or {}).get("checkpoint"):
        raise ConfigError("invalid chain config: experiment.model.checkpoint is set, but every generation "
                          "trains from scratch; remove experiment.model.checkpoint")
    name = str(exp.get("name", "run"))
    root = Path(str(exp.get("output_dir", "runs"))) / name
    configs = []
    for m in range(parsed.chain.generations + 1):
        try:
            configs.append(validate_config(generation_dict(exp, parsed.chain, m, root)))
        except ConfigError as exc:
            text = str(exc).replace("invalid config:", f"invalid chain config (experiment block, generation {m}):", 1)
            raise ConfigError(text) from None
    kept = configs[0].train.save
    if (kept, parsed.chain.checkpoint) in (("none", "best"), ("none", "last"), ("best", "last")):
        raise ConfigError(f"invalid chain config: chain.checkpoint={parsed.chain.checkpoint} teaches each generation "
                          f"with {parsed.chain.checkpoint}.pt of the one before, which experiment.train.save={kept} "
                          "does not keep; set experiment.train.save=last"
                          + (" or chain.checkpoint=best" if kept == "best" else ""))
    resolved = {"experiment": exp, "chain": parsed.chain.model_dump(mode="json")}
    return Chain(name=name, root=root, settings=parsed.chain, configs=configs, raw=resolved)


__all__ = ["Chain", "ChainFile", "ChainSettings", "format_notation", "generation_dict", "is_chain_file",
           "load_chain", "parse_notation", "read_chain_yaml", "route_overrides"]
