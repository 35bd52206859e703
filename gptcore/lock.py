"""A run directory (or a token dataset being prepared) is owned by one
process at a time: an advisory lock (flock) on DIR/.lock, held for the whole
run and released by the kernel when the process ends, however it ends. The
file names the holder's pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gptcore.errors import RunError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(out_dir: Path, hint: str = "one trainer per run directory; wait for it or choose another "
                                       "train.out_dir"):
    """Hold OUT_DIR's lock (creating the directory) or fail with one line naming the holder (and `hint`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise RunError(f"{out_dir} is in use by process {holder} ({hint})") from None
        pid = f"{os.getpid()}\n".encode()
        if os.pread(fd, 32, 0) != pid:
            os.ftruncate(fd, 0)
            os.pwrite(fd, pid, 0)
        yield
    finally:
        os.close(fd)  # releases the lock
