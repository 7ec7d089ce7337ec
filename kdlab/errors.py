"""User-facing errors.

`KDLabError` is the one exception type the CLI turns into a clean one-paragraph message
(no traceback). Raise it (or a subclass) for anything a user can fix: bad config, missing
data, mismatched checkpoint. Programming errors stay ordinary exceptions.
"""
from __future__ import annotations


class KDLabError(Exception):
    """An error caused by user input, with a message that names the problem and the fix."""


class ConfigError(KDLabError):
    """The experiment config is invalid (unknown key, wrong type, bad value)."""


class DataError(KDLabError):
    """A dataset is missing, in the wrong layout, empty or inconsistent with the model."""


class CheckpointError(KDLabError):
    """A checkpoint is missing, corrupt, or belongs to another architecture."""


class TrainingError(KDLabError):
    """Training cannot continue (for example a non-finite loss)."""
