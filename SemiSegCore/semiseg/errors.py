"""The project's own errors. The command line prints them as one line (``semiseg <command>: error: ...``)."""
from __future__ import annotations


class SemiSegError(Exception):
    """Base of every error that says what is wrong with the user's input, files or run directory."""


class CheckpointError(SemiSegError):
    """A checkpoint that cannot be read, or that does not fit the configured model."""


class RunDirError(SemiSegError):
    """A run directory that is not one (no config or checkpoint), is in use by another process, or was started with
    another config."""


class TrainingError(SemiSegError):
    """Training cannot go on (e.g. the loss is no longer finite)."""
