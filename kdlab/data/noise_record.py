"""The record of a run's corrupted training labels (DKD Table 3: symmetric label noise).

`build_datasets` corrupts the training labels when `data.label_noise > 0`, seeded by
`data.noise_seed` only, so a teacher and a student whose configs share `label_noise`,
`noise_seed` (and `train_subset`/`train.seed` when a subset is used) train on the same
labels. To make that checkable after the fact, every noisy run writes beside its checkpoints:

- `label_noise.json`: ratio, noise_seed, number of samples, number flipped, the measured flip
  ratio, and the SHA-256 of the labels (as little-endian int64), noisy and clean;
- `noisy_labels.npy`: the training labels the run used (int64, in training-set order).

When the run has a teacher whose folder holds its own `label_noise.json`, the record also says
whether the two label sets are identical (`teacher_same_labels`), and a mismatch is logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("kdlab")

RECORD_NAME = "label_noise.json"
LABELS_NAME = "noisy_labels.npy"


def label_hash(targets: Sequence[int]) -> str:
    """SHA-256 (hex) of the labels as little-endian int64: equal hashes, equal label lists."""
    return hashlib.sha256(np.asarray(list(targets), dtype="<i8").tobytes()).hexdigest()


def noise_record(data_cfg: Any, train_set: Any, train_targets: Sequence[int]) -> dict[str, Any]:
    """The record of `train_targets` (the labels the run trains on) and how they were made."""
    targets = [int(t) for t in train_targets]
    clean = [int(t) for t in getattr(train_set, "clean_targets", targets)]
    flipped = sum(a != b for a, b in zip(targets, clean))
    n = len(targets)
    return {
        "ratio": float(data_cfg.label_noise),
        "noise_seed": int(data_cfg.noise_seed),
        "dataset": data_cfg.name,
        "train_subset": data_cfg.train_subset,
        "num_samples": n,
        "num_flipped": int(flipped),
        "measured_ratio": flipped / n if n else 0.0,
        "labels_sha256": label_hash(targets),
        "clean_labels_sha256": label_hash(clean),
    }


def read_noise_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The `label_noise.json` of a run folder, or None when the run had clean labels."""
    path = Path(run_dir) / RECORD_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_noise_record(
    run_dir: str | Path,
    data_cfg: Any,
    train_set: Any,
    train_targets: Sequence[int],
    teacher_checkpoint: str | None = None,
) -> dict[str, Any] | None:
    """Write `label_noise.json` and `noisy_labels.npy` into `run_dir` when the labels are
    noisy (`data_cfg.label_noise > 0`); return the record (None for clean labels)."""
    if not data_cfg.label_noise or data_cfg.label_noise <= 0:
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = noise_record(data_cfg, train_set, train_targets)
    record["teacher_same_labels"] = None
    if teacher_checkpoint:
        teacher = read_noise_record(Path(teacher_checkpoint).parent)
        if teacher is not None:
            same = teacher.get("labels_sha256") == record["labels_sha256"]
            record["teacher_same_labels"] = same
            if not same:
                log.warning(
                    "the teacher (%s) was trained on other noisy labels than this run (ratio %s seed %s "
                    "vs ratio %s seed %s): give both configs the same data.label_noise, data.noise_seed "
                    "and data.train_subset", teacher_checkpoint, teacher.get("ratio"),
                    teacher.get("noise_seed"), record["ratio"], record["noise_seed"],
                )
    np.save(run_dir / LABELS_NAME, np.asarray(list(train_targets), dtype="<i8"))
    (run_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["LABELS_NAME", "RECORD_NAME", "label_hash", "noise_record", "read_noise_record", "write_noise_record"]
