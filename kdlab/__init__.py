"""kdlab: knowledge distillation for image classifiers and object detectors (DKD, ReviewKD,
tolerant teachers, KD), open to methods, models, datasets and tasks of your own.

Entry points: the `kdlab` CLI (`kdlab --help`), `kdlab.config.load_config`,
`kdlab.engine.trainer.Trainer`, `kdlab.models.create_model`, `kdlab.losses`.
"""
__version__ = "0.1.0"
