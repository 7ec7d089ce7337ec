"""`on_setup(trainer)`: what the experiment modes need once the data and distiller exist.

The trainer calls this once in `Trainer.setup`, after the datasets and the distiller are
built and moved to the device, before a resumed checkpoint is loaded. It

1. writes the corrupted-label record of a noisy run (`kdlab.experiments.noise`);
2. calls the method's `prepare(...)` when it has one: `dkd_split` ranks the training
   samples by the teacher's target confidence there (one teacher pass, before training).
"""
from __future__ import annotations

from typing import Any

from kdlab.experiments.noise import write_noise_record


def on_setup(trainer: Any) -> None:
    cfg = trainer.cfg
    data = trainer.data
    if trainer.is_main:
        teacher_ckpt = cfg.teacher.checkpoint if cfg.teacher is not None else None
        write_noise_record(trainer.run_dir, cfg.data, data.train, data.train_targets, teacher_ckpt)
    prepare = getattr(trainer.distiller, "prepare", None)
    if callable(prepare):
        prepare(
            train_set=data.train,
            data_cfg=cfg.data,
            seed=cfg.train.seed,
            device=trainer.device,
            run_dir=trainer.run_dir if trainer.is_main else None,
        )


__all__ = ["on_setup"]
