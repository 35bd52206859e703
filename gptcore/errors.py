"""The one error base of the project, and atomic file writes.

Every error a user can cause (a bad config, corpus, tokenizer, checkpoint,
prompt, file format or run directory) is a `UserError`; the command lines
catch it in one place (`gptcore.cli.guarded`) and print one line
`error: ...` with exit status 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Bad input, reported as one line; subclasses name the kind."""


class RunError(UserError):
    """A run that cannot start or go on (existing outputs, nothing to resume, no memory for it, divergence, ...)."""


class Stopped(Exception):
    """A run stopped on request (SIGINT / SIGTERM) after saving what it had:
    one line, not an error, and `code` as the exit status (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary sibling and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes never share one
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
