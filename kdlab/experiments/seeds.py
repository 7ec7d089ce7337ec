"""One config under several seeds (`kdlab train CONFIG --seeds N`).

Seed k of N (k = 0..N-1) is the config with `train.seed = base + k` and `name =
<name>_seed<base + k>`, so each seed gets its own run folder and `kdlab results` groups them
back together. Single-run numbers of distillation papers vary by several tenths of a point
across seeds (PAPERS.md: ResNet32x4 -> ResNet8x4 DKD spans 75.8-76.2), hence mean and std.
"""
from __future__ import annotations

import logging
from typing import Any

from kdlab.config.loader import config_to_dict, validate_config
from kdlab.schema.experiment import ExperimentConfig
from kdlab.engine.launch import claimed
from kdlab.engine.run_folder import RunFolder
from kdlab.engine.trainer import Trainer
from kdlab.errors import ConfigError
from kdlab.experiments.results import format_text, group_runs, read_run, seed_run_name

log = logging.getLogger("kdlab")


def seed_configs(cfg: ExperimentConfig, n: int) -> list[ExperimentConfig]:
    """`n` copies of `cfg` with seeds train.seed, +1, ... and names `<name>_seed<seed>`."""
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}")
    out = []
    for k in range(n):
        raw = config_to_dict(cfg)
        seed = cfg.train.seed + k
        raw["name"] = seed_run_name(cfg.name, seed)
        raw["train"]["seed"] = seed
        out.append(validate_config(raw))
    return out


def run_seeds(cfg: ExperimentConfig, n: int, resume: bool | str = False, overwrite: bool = False) -> list[Any]:
    """Train the `n` seed variants of `cfg` one after another; return their `RunResult`s.

    Every seed's folder is claimed before the first seed trains (`kdlab.engine.launch.claimed`):
    a folder that holds a run is refused unless `resume` (finished seeds are kept, an
    interrupted one continues) or `overwrite` (every seed is trained again)."""
    configs = seed_configs(cfg, n)
    folders = [RunFolder.of(c) for c in configs]
    results = []
    with claimed(folders, resume=bool(resume), overwrite=overwrite, cfgs=configs):
        for i, (seed_cfg, folder) in enumerate(zip(configs, folders)):
            log.info("== seed %d (%d of %d): %s", seed_cfg.train.seed, i + 1, n, seed_cfg.name)
            results.append(Trainer(seed_cfg, resume=bool(resume), folder=folder).fit())
    return results


def seeds_summary(run_dirs: list[str]) -> str:
    """The `kdlab results` table (mean ± sample std over the seeds) of these run folders."""
    return format_text(group_runs([read_run(d) for d in run_dirs]))


def run_seeds_cli(cfg: ExperimentConfig, n: int, resume: bool | str = False, overwrite: bool = False) -> int:
    """`kdlab train CONFIG --seeds N`: train, print one line per seed and the summary table."""
    if isinstance(resume, str):
        raise ConfigError("--resume CHECKPOINT names one run's checkpoint and cannot be combined with --seeds; "
                          "use --resume alone (each seed continues its own <name>_seed<k>/last.pt)")
    results = run_seeds(cfg, n, resume, overwrite)
    for r in results:
        print(f"{r.run_dir}: {r.summary()}")
    print()
    print(seeds_summary([r.run_dir for r in results]), end="")
    return 0


__all__ = ["run_seeds", "run_seeds_cli", "seed_configs", "seeds_summary"]
