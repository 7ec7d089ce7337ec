"""The engine: runs a method (`kdlab.methods`) on a model and data — the trainer, the training
step, evaluation, checkpoints, distributed setup and the teacher-output cache.

This file imports nothing, so importing one engine module never loads the others.
"""
