"""kdlab's one definition of "the same experiment".

Two configs are the same experiment when they agree on everything but

- where the run is written (`name`, `output_dir`),
- where its plugins' code is found (`imports`: a moved plugin file is the same method), and
- the settings in `VOLATILE`, which change where the data lives, how fast it runs or how it
  is logged, not what is trained.

Who asks: a run folder (`kdlab.engine.run_folder.RunFolder.resume_refusal`) refuses to be
resumed by `kdlab train --resume` (and the trainer a checkpoint) for another experiment, and to
be reused or resumed by `kdlab reproduce` / `kdlab generations`; so `VOLATILE` is also the
documented list of what may change on `--resume` (README, "No command writes over"); and
`kdlab results` flags a seed group whose runs are not the same experiment up to their seed
(`across_seeds=True`).
"""
from __future__ import annotations

from typing import Any

# The run's own place, and where its plugins' code lives: never part of what is trained.
PLACE = ("name", "output_dir", "imports")

VOLATILE: dict[str, set[str]] = {
    "data": {"root", "num_workers", "pin_memory", "persistent_workers", "eval_batch_size", "pipeline"},
    "train": {"device", "progress", "tensorboard", "save", "save_every", "eval_every", "compile", "channels_last",
              "deterministic", "nonfinite", "max_skipped", "amp", "check_every"},
    "teacher": {"checkpoint", "cache"},
}


def experiment_identity(cfg: dict, *, across_seeds: bool = False) -> dict:
    """The parts of a config dict that define what is trained (`across_seeds`: the seed too)."""
    out = {}
    for section, value in cfg.items():
        if section in PLACE:
            continue
        if isinstance(value, dict):
            drop = set(VOLATILE.get(section, ()))
            if across_seeds and section == "train":
                drop.add("seed")
            value = {k: v for k, v in value.items() if k not in drop}
        out[section] = value
    return out


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, as 'key: old -> new' (a section missing on
    one side is compared key by key, as if it were empty)."""
    if isinstance(a, dict) and b is None:
        b = {}
    if isinstance(b, dict) and a is None:
        a = {}
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += config_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def run_differences(saved: dict, wanted: dict, *, across_seeds: bool = False) -> list[str]:
    """What makes the saved run's config another experiment than `wanted` ([] if none)."""
    return config_differences(experiment_identity(saved, across_seeds=across_seeds),
                              experiment_identity(wanted, across_seeds=across_seeds))
