"""One error type for every unreadable or unsuitable model file, always naming the file."""
from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """Raised when a checkpoint/tokenizer cannot be loaded; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
