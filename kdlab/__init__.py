"""kdlab: knowledge distillation for image classifiers (DKD, ReviewKD, tolerant teachers, KD).

Entry points: the `kdlab` CLI (`kdlab --help`), `kdlab.config.load_config`,
`kdlab.engine.trainer.Trainer`, `kdlab.models.create_model`, `kdlab.losses`.
"""
__version__ = "0.1.0"
