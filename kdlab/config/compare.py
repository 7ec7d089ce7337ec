"""Is a finished run folder the same experiment as the one now asked for?

`kdlab reproduce` and `kdlab generations` reuse finished runs and resume interrupted ones;
both must refuse a folder that trained something else. Two configs are the same experiment
when they agree on everything but the settings below, which change where the data lives,
how fast it runs or how it is logged, not what is trained.
"""
from __future__ import annotations

from typing import Any

VOLATILE: dict[str, set[str]] = {
    "data": {"root", "num_workers", "pin_memory", "persistent_workers", "eval_batch_size", "pipeline"},
    "train": {"device", "progress", "tensorboard", "save_every", "eval_every", "compile", "channels_last",
              "deterministic", "nonfinite", "max_skipped", "amp"},
    "teacher": {"checkpoint", "cache"},
}


def experiment_identity(cfg: dict) -> dict:
    """The parts of a config dict that define what is trained."""
    out = {}
    for section in ("model", "teacher", "method", "data", "optim", "schedule", "train"):
        value = cfg.get(section)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in VOLATILE.get(section, set())}
        out[section] = value
    return out


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, as 'key: old -> new'."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += config_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def run_differences(saved: dict, wanted: dict) -> list[str]:
    """What makes the saved run's config another experiment than `wanted` ([] if none)."""
    return config_differences(experiment_identity(saved), experiment_identity(wanted))
