"""Training in generations (Yang, Xie, Qiao, Yuille, arXiv 1805.05551): one config, one chain.

A chain config has two blocks:

    experiment:   # a normal experiment config (model, data, optim, schedule, train; no method
      ...         # or teacher: the chain sets those per generation). May name `base:` files.
    chain:        # ChainSettings: the patriarch's loss, lambda, tau, number of generations, ...
      notation: "D(0.6, 0.6)"
      generations: 5

Generation 0 (the patriarch) trains with method `tolerant` (kind strict / tsd /
label_smoothing / confidence_penalty); generation m >= 1 with method `generation` (lam, tau),
taught by generation m - 1's `best.pt` or `last.pt` (`chain.checkpoint`). Runs go to
`<output_dir>/<experiment.name>/gen<m>/`, each a normal `kdlab train` run folder.

Resuming: a generation with `result.json` is finished and skipped; an interrupted one continues
from its `last.pt`; a folder trained with another config is refused (never silently reused).
The report (`kdlab.analysis.generations`) is written after the last generation.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import Field, NonNegativeInt, PositiveFloat, ValidationError, model_validator

from kdlab.config.compare import run_differences
from kdlab.config.loader import (
    apply_overrides, config_to_dict, deep_merge, load_yaml_mapping, read_yaml, validate_config,
)
from kdlab.config.schema import ExperimentConfig, StrictModel
from kdlab.errors import CheckpointError, ConfigError
from kdlab.losses.tolerant import check_eta
from kdlab.registry import closest

log = logging.getLogger("kdlab")

PatriarchKind = Literal["strict", "tsd", "label_smoothing", "confidence_penalty"]
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


class ChainSettings(StrictModel):
    """The `chain:` block. Every value the paper leaves open is a setting (docs/tolerant.md)."""

    notation: str | None = Field(default=None, description="the paper's D(eta, lambda); sets eta and lam")
    patriarch: PatriarchKind | None = Field(
        default=None, description="generation 0's loss; default: strict when eta = 1, else tsd")
    eta: float | None = Field(default=None, gt=0.0, le=1.0, description="tsd: CE weight (default 0.6; 1 = strict)")
    k: int = Field(default=5, ge=2, description="tsd and metrics: primary + k - 1 secondary classes")
    scores: Literal["logits", "probabilities"] = "logits"
    primary: Literal["target", "top1"] = "target"
    smoothing: float = Field(default=0.1, ge=0.0, lt=1.0, description="label_smoothing patriarch: epsilon")
    penalty: float = Field(default=0.1, ge=0.0, description="confidence_penalty patriarch: beta")
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
        # Resolve eta / lam / patriarch before field validation so that every later check
        # (and the saved chain.yaml) sees concrete values.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("notation") is not None:
            n_eta, n_lam = parse_notation(str(data["notation"]))
            if data.get("eta") is not None and float(data["eta"]) != n_eta:
                raise ValueError(f"notation {data['notation']!r} says eta={n_eta:g} but chain.eta={data['eta']}; "
                                 "make them agree or drop one")
            lam = data.get("lam")
            if lam is not None and any(float(x) != n_lam for x in (lam if isinstance(lam, list) else [lam])):
                raise ValueError(f"notation {data['notation']!r} says lam={n_lam:g} but chain.lam={lam}; "
                                 "make them agree or drop one")
            if data.get("eta") is None:
                data["eta"] = n_eta
            if lam is None:
                data["lam"] = n_lam
        patriarch = data.get("patriarch")
        if data.get("eta") is None:
            data["eta"] = 0.6 if patriarch in (None, "tsd") else 1.0
        if patriarch is None:
            data["patriarch"] = "strict" if float(data["eta"]) == 1.0 else "tsd"
        if data.get("lam") is None:
            data["lam"] = 0.6
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ChainSettings":
        assert self.eta is not None and self.lam is not None
        if self.patriarch == "tsd":
            check_eta(self.eta, self.scores)
        elif self.eta != 1.0:
            raise ValueError(
                f"chain.eta={self.eta} only applies to patriarch 'tsd' (the {self.patriarch} patriarch "
                "has eta = 1); set chain.patriarch: tsd or drop chain.eta"
            )
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
        if self.patriarch in ("strict", "tsd"):
            return format_notation(float(self.eta or 1.0), lam)
        soft = f"LS({self.smoothing:g})" if self.patriarch == "label_smoothing" else f"CP({self.penalty:g})"
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

    def checkpoint(self, m: int) -> Path:
        return self.run_dir(m) / f"{self.settings.checkpoint}.pt"


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
    if isinstance(exp, dict) and exp.get("base"):
        ebases = exp.pop("base")
        merged_exp: dict = {}
        for b in [ebases] if isinstance(ebases, str) else ebases:
            merged_exp = deep_merge(merged_exp, read_yaml(path.parent / b))
        data["experiment"] = deep_merge(merged_exp, exp)
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_chain_yaml(path.parent / b, _seen + (resolved,)))
    return deep_merge(merged, data)


def route_overrides(overrides: Iterable[str]) -> list[str]:
    """Let `train.epochs=2` mean `experiment.train.epochs=2` (chain settings need `chain.`)."""
    out = []
    for text in overrides:
        head = text.split("=", 1)[0].strip().split(".", 1)[0]
        out.append(f"experiment.{text.strip()}" if head in _EXPERIMENT_KEYS else text)
    return out


def _format_chain_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        key = ".".join(loc) or "(chain config)"
        if err["type"] == "extra_forbidden":
            cls = ChainSettings if loc[:1] == ("chain",) else ChainFile
            valid = sorted(cls.model_fields)
            hint = closest(loc[-1], valid)
            msg = f"unknown key {key!r}"
            if hint:
                msg += f"; did you mean {'.'.join(loc[:-1] + (hint,))!r}?"
            msg += f" Valid keys here: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = f"missing required key {key!r}" + (
                " (the experiment every generation trains: model, data, optim, schedule, train)"
                if key == "experiment" else "")
        else:
            text = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            got = err.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"{key}: {text}{got_text}"
        lines.append(msg)
    return "invalid chain config:\n  - " + "\n  - ".join(lines)


def generation_dict(experiment: dict, settings: ChainSettings, m: int, root: Path) -> dict:
    """The raw experiment config of generation m (validated by the caller)."""
    raw = copy.deepcopy(experiment)
    raw["name"] = f"gen{m}"
    raw["output_dir"] = str(root)
    train = raw.setdefault("train", {}) or {}
    raw["train"] = train
    train["seed"] = int(train.get("seed", 0)) + m * settings.seed_offset
    if m == 0:
        raw["method"] = {
            "name": "tolerant", "kind": settings.patriarch, "eta": settings.eta, "k": settings.k,
            "scores": settings.scores, "primary": settings.primary,
            "smoothing": settings.smoothing, "penalty": settings.penalty,
        }
    else:
        raw["method"] = {"name": "generation", "lam": settings.lam_of(m), "tau": settings.tau}
        model = raw.get("model") or {}
        raw["teacher"] = {
            "name": model.get("name"),
            "kwargs": copy.deepcopy(model.get("kwargs", {})),
            "checkpoint": str(root / f"gen{m - 1}" / f"{settings.checkpoint}.pt"),
        }
    return raw


def load_chain(path: str | Path | None = None, overrides: Iterable[str] = (), data: dict | None = None) -> Chain:
    """Read (or take) a chain config, apply dotted overrides, validate it and every generation."""
    raw = read_chain_yaml(path) if path is not None else copy.deepcopy(data or {})
    raw = apply_overrides(raw, route_overrides(overrides))
    try:
        parsed = ChainFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_chain_errors(exc)) from None
    exp = parsed.experiment
    for key in ("method", "teacher"):
        if exp.get(key) is not None:
            raise ConfigError(
                f"invalid chain config: experiment.{key} is set, but the chain chooses each generation's "
                f"{key} itself (patriarch: chain.patriarch/eta, students: chain.lam/tau); remove experiment.{key}"
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
    resolved = {"experiment": exp, "chain": parsed.chain.model_dump(mode="json")}
    return Chain(name=name, root=root, settings=parsed.chain, configs=configs, raw=resolved)


# ---------------------------------------------------------------------------- running
def check_run_dir(chain: Chain, m: int) -> bool:
    """True when generation m is finished. Raises when its folder holds a different run, or when
    its teacher changed after it was trained (the chain would no longer be a chain)."""
    run_dir = chain.run_dir(m)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        diffs = run_differences(old, config_to_dict(chain.configs[m]))
        if diffs:
            raise ConfigError(
                f"{run_dir} holds generation {m} trained with another config ({'; '.join(diffs[:4])}); "
                f"use another experiment.name or output_dir, or delete {run_dir} and every later generation"
            )
    done = (run_dir / "result.json").is_file()
    # The student's own last.pt (written every epoch) dates its training; a teacher checkpoint
    # newer than it means generation m - 1 was retrained after m learnt from the old one.
    student = run_dir / "last.pt" if (run_dir / "last.pt").is_file() else run_dir / "result.json"
    if m > 0 and student.is_file():
        teacher = chain.checkpoint(m - 1)
        if teacher.is_file() and teacher.stat().st_mtime > student.stat().st_mtime:
            state = "finished" if done else "started"
            raise CheckpointError(
                f"{teacher} was rewritten after generation {m} {state} training from it; delete "
                f"{run_dir} and every later generation so that they retrain from the new teacher"
            )
    return done


def _is_main_process() -> bool:
    # Under torchrun every rank runs the chain (each Trainer joins the process group);
    # only rank 0 writes the chain's own files.
    return os.environ.get("RANK", "0") == "0"


def run_chain(chain: Chain, *, report: bool = True, stop_after: int | None = None) -> dict[str, Any] | None:
    """Train every unfinished generation in order, then write and return the report.

    `stop_after=m` stops once generation m is finished (tests use it to simulate interruptions).
    """
    from kdlab.engine.trainer import Trainer

    main = _is_main_process()
    if main:
        chain.root.mkdir(parents=True, exist_ok=True)
        (chain.root / "chain.yaml").write_text(yaml.safe_dump(chain.raw, sort_keys=False))
    for m, cfg in enumerate(chain.configs):
        if check_run_dir(chain, m):
            log.info("generation %d: finished earlier (%s), skipped", m, chain.run_dir(m) / "result.json")
        else:
            if m > 0 and not chain.checkpoint(m - 1).is_file():
                raise CheckpointError(
                    f"generation {m - 1} is finished but {chain.checkpoint(m - 1)} is missing; "
                    f"delete {chain.run_dir(m - 1)} to retrain it, or set chain.checkpoint to the one that exists"
                )
            what = cfg.method.name if m == 0 else f"generation (lam {chain.settings.lam_of(m):g})"
            log.info("generation %d/%d: %s -> %s", m, chain.settings.generations, what, chain.run_dir(m))
            Trainer(cfg, resume=True, run_dir=chain.run_dir(m)).fit()
        if stop_after is not None and m >= stop_after:
            return None
    if not report or not main:
        return None
    from kdlab.analysis.generations import write_report

    return write_report(chain)


def finished_generations(chain: Chain) -> list[int]:
    """Generations 0..m-1 that are finished, in order, stopping at the first unfinished one."""
    out = []
    for m in range(len(chain.configs)):
        if not (chain.run_dir(m) / "result.json").is_file() or not chain.checkpoint(m).is_file():
            break
        out.append(m)
    return out


def read_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


__all__ = [
    "Chain",
    "ChainSettings",
    "check_run_dir",
    "finished_generations",
    "format_notation",
    "generation_dict",
    "load_chain",
    "parse_notation",
    "read_chain_yaml",
    "read_result",
    "route_overrides",
    "run_chain",
]
