"""The error raised for unusable checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable/truncated file, bad index, missing/extra key, wrong shape/dtype.

    The message names the file, the key, what was expected and what was found. ``problems`` holds one line per
    problem when several were found at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])
