"""One error type for every unreadable or unsuitable model file, always naming the file.

`minimind <command>` prints a CheckpointError as one paragraph and exits with code 2 (cli.py): the message says
which file, what is wrong with it and what to do."""
from __future__ import annotations

import re
from pathlib import Path

EXIT_CODE = 2


class CheckpointError(ValueError):
    """Raised when a checkpoint/tokenizer cannot be loaded; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def reason(exc: BaseException, limit: int = 160) -> str:
    """`Type: first sentence` of a parser's exception, short: libraries append paragraphs of advice that do not
    apply to a damaged file (torch's zip reader, for one)."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    if len(first) > limit:
        first = first[:limit - 3].rstrip() + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
