"""Helpers shared by subcommands."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdlab.errors import ConfigError, KDLabError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied after the file, e.g. train.epochs=5 method.beta=8 data.root=/data",
    )


IMPORT_HELP = ("import a plugin before the command reads any config: a module name or a path to a .py file "
               "(relative to the working directory) that registers methods, models, datasets or tasks; repeat "
               "for several. A run trained with it records it in its config.yaml (imports:)")


def add_import_arg(p: argparse.ArgumentParser) -> None:
    """--import MODULE_OR_FILE (repeatable): every command takes it (kdlab.config.plugins)."""
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help=IMPORT_HELP)


def resumed_run_imports(config: str, overrides: list[str]) -> list[str]:
    """The plugins recorded in the config.yaml of the run folder that `config` with `overrides`
    names ([] when it holds none): `kdlab train CONFIG --resume` finds the run's method even when
    it came from an --import not repeated."""
    # lazy: keeps `kdlab --help` fast (yaml, pydantic and torch load only when a command runs)
    from kdlab.config.loader import apply_overrides, read_yaml
    from kdlab.config.plugins import resolve_specs
    from kdlab.engine.run_folder import RunFolder

    raw = apply_overrides(read_yaml(config), overrides)
    saved = RunFolder(Path(str(raw.get("output_dir", "runs"))) / str(raw.get("name", "run"))).saved_config()
    return resolve_specs((saved or {}).get("imports"))


OVERWRITE_HELP = ("replace what the run folder holds: delete the files kdlab wrote for the earlier run (nothing "
                  "else), then train from scratch")


def add_run_folder_args(p: argparse.ArgumentParser, resume_help: str, *, resume_checkpoint: bool = False) -> None:
    """--resume and --overwrite (one or the other): the two ways to train into a folder that
    already holds a run (the third is another name=); without either, such a folder is refused
    untouched (kdlab.engine.run_folder). `resume_checkpoint`: --resume may name the checkpoint."""
    g = p.add_mutually_exclusive_group()
    if resume_checkpoint:
        g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT", help=resume_help)
    else:
        g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


#: Written into a demo's --output-dir: marks the runs there as the demo's own, so that a later
#: demo (classification or detection) may replace them.
DEMO_MARKER = "kdlab-demo.json"


def earlier_demo(output_dir: Path, run_names: list[str]) -> bool:
    """True when `output_dir` holds an earlier demo (its marker file), whose runs this one replaces
    (`overwrite`). Run folders of the demo's names without the marker are someone else's: refused."""
    if (output_dir / DEMO_MARKER).is_file():
        return True
    taken = [output_dir / name for name in run_names if (output_dir / name).exists()]
    if taken:
        raise KDLabError(
            f"{taken[0]} exists but was not written by 'kdlab demo' (there is no {output_dir / DEMO_MARKER}); "
            "pass another --output-dir, or move that folder away"
        )
    return False


def add_exec_args(p: argparse.ArgumentParser) -> None:
    """--jobs, --jobs-per-device, --launcher: how a command's plan of runs is executed
    (kdlab.plan.executor; every command that trains several runs takes them)."""
    g = p.add_argument_group("running several runs (kdlab.plan; docs/sweeps.md)")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once on this machine, each in its own process with its share of the CPU cores "
                        "and, on GPUs, its own device (default 1: one after another in this process)")
    g.add_argument("--jobs-per-device", type=int, default=1, metavar="K",
                   help="runs sharing one GPU, for small students that do not fill one (default 1)")
    g.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="slurm: submit one Slurm job per run through submitit (pip install 'kdlab[slurm]'), "
                        "students after their teachers; resources from the file's launcher: block (docs/cluster.md)")
    g.add_argument("--launcher-config", default=None, metavar="FILE.yaml",
                   help="--launcher slurm: a YAML mapping of the Slurm resources (partition, gpus_per_job, "
                        "cpus_per_job, mem_gb, time_min, account, qos, constraint, sbatch, folder, wait; "
                        "kdlab.plan.slurm), or a file with such a launcher: block; its keys override a sweep "
                        "file's launcher: block")


def exec_options(args: argparse.Namespace, settings: dict | None = None):
    """The `kdlab.plan.ExecOptions` of the --jobs/--jobs-per-device/--launcher arguments;
    `settings`: the Slurm resources of the command's file (a sweep's `launcher:` block), which
    --launcher-config's keys override."""
    from kdlab.plan.executor import ExecOptions  # lazy: keeps `kdlab --help` fast

    return ExecOptions(jobs=args.jobs, jobs_per_device=args.jobs_per_device, launcher=args.launcher,
                       launcher_settings={**(settings or {}), **launcher_settings(args)})


def launcher_settings(args: argparse.Namespace) -> dict:
    """The Slurm resources of --launcher-config (a mapping, or a file's `launcher:` block);
    `kdlab.plan.slurm` checks the keys."""
    path = args.launcher_config
    if path is None:
        return {}
    if args.launcher != "slurm":
        raise ConfigError(f"--launcher-config {path} sets Slurm resources, but the runs are local; add "
                          "--launcher slurm (or drop --launcher-config)")
    import yaml  # lazy: keeps `kdlab --help` fast

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--launcher-config {path}: cannot read it ({exc.strerror}); pass an existing "
                          "YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--launcher-config {path} is not valid YAML ({exc}); fix the file") from None
    if isinstance(data, dict) and set(data) == {"launcher"}:
        data = data["launcher"]
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--launcher-config {path} must be a YAML mapping of Slurm resources "
                          f"(e.g. partition: gpu, gpus_per_job: 1, time_min: 600), not a {type(data).__name__}")
    return data
