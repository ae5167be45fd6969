"""Errors the trainer raises (the entry point maps them to exit status 1)."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row, a missing stage checkpoint)."""
