"""One config under several seeds (`kdlab train CONFIG --seeds N`).

Seed k of N (k = 0..N-1) is the config with `train.seed = base + k` and `name =
<name>_seed<base + k>`, so each seed gets its own run folder and `kdlab results` groups them
back together. Single-run numbers of distillation papers vary by several tenths of a point
across seeds (PAPERS.md: ResNet32x4 -> ResNet8x4 DKD spans 75.8-76.2), hence mean and std.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdlab.config.loader import config_to_dict, validate_config
from kdlab.schema.experiment import ExperimentConfig
from kdlab.engine.result import RunResult
from kdlab.engine.run_folder import RunFolder
from kdlab.plan import ExecOptions, Job, Plan, execute
from kdlab.plan.executor import run_plan_cli
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


def seeds_plan(cfg: ExperimentConfig, n: int, resume: bool | str = False, overwrite: bool = False) -> Plan:
    """The plan of the `n` seed runs of `cfg`: independent jobs, logs in `<output_dir>/logs/`."""
    jobs = [Job.train(c, resume=bool(resume), overwrite=overwrite, retry=f"kdlab train CONFIG --seeds {n}")
            for c in seed_configs(cfg, n)]
    return Plan(f"{cfg.name} x {n} seeds", jobs, log_dir=Path(cfg.output_dir) / "logs")


def run_seeds(cfg: ExperimentConfig, n: int, resume: bool | str = False, overwrite: bool = False,
              options: ExecOptions | None = None) -> list[Any]:
    """Train the `n` seed variants of `cfg` (one after another, or `options.jobs` at once); return
    the `RunResult`s of the seeds that finished. Each seed's folder is claimed when it starts
    (the command checks them all before the first one trains: `kdlab.commands.train`): with
    `resume`, finished seeds are kept and an interrupted one continues; `overwrite` trains every
    seed again. A seed that fails does not stop the others (`kdlab.plan`)."""
    report = execute(seeds_plan(cfg, n, resume, overwrite), options)
    return [RunResult.from_json(RunFolder(j.run_dir).read_result()) for j in report.plan.jobs if report.ok(j.name)]


def seeds_summary(run_dirs: list[str]) -> str:
    """The `kdlab results` table (mean ± sample std over the seeds) of these run folders."""
    return format_text(group_runs([read_run(d) for d in run_dirs]))


def run_seeds_cli(cfg: ExperimentConfig, n: int, resume: bool | str = False, overwrite: bool = False,
                  options: ExecOptions | None = None) -> int:
    """`kdlab train CONFIG --seeds N`: train, print one line per seed and the summary table of
    the seeds that finished; the table of jobs and exit status 1 when a seed failed."""
    if isinstance(resume, str):
        raise ConfigError("--resume CHECKPOINT names one run's checkpoint and cannot be combined with --seeds; "
                          "use --resume alone (each seed continues its own <name>_seed<k>/last.pt)")
    report = run_plan_cli(seeds_plan(cfg, n, resume, overwrite), options or ExecOptions())
    dirs = [j.run_dir for j in report.plan.jobs if report.ok(j.name)]
    for d in dirs:
        print(f"{d}: {RunResult.from_json(RunFolder(d).read_result()).summary()}")
    if dirs:
        print()
        print(seeds_summary(dirs), end="")
    return report.exit_code()


__all__ = ["run_seeds", "run_seeds_cli", "seed_configs", "seeds_plan", "seeds_summary"]
