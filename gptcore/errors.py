"""The one error base of the project, and atomic file writes.

Every error a user can cause (a bad config, corpus, tokenizer, checkpoint,
prompt, file format or run directory) is a `UserError`; the command lines
catch it in one place (`gptcore.cli.guarded`) and print one line
`error: ...` with exit status 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
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


def check_regular_file(path: str | Path, what: str, max_bytes: int | None = None) -> Path:
    """path, when it names a regular file (after symlinks) of at most
    max_bytes: devices (/dev/zero), FIFOs and sockets would be read forever
    or block, and an over-large file would fill the memory before any check."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"{what} {path} is {kind}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserError(f"{what} {path} is {st.st_size:,} bytes, more than the {max_bytes:,} accepted")
    return path


def checkpoint_write_failed(what: str, e: BaseException, directory: Path) -> RunError:
    """The one line for a checkpoint that could not be written into
    directory (its temporary files already removed by the caller): a full
    disk said so, whatever words the writer used (torch's zip writer: none)."""
    full = getattr(e, "errno", None) == errno.ENOSPC or "no space left on device" in str(e).lower()
    try:
        full = full or shutil.disk_usage(directory).free < 2**20
    except OSError:
        pass
    reason = "the disk is full" if full else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return RunError(f"cannot write {what} ({reason}); the checkpoints before it are intact: make room and "
                    f"continue with --resume")
