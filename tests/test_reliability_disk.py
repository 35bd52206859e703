"""A run directory under pressure (tests/test_reliability.py's preset and
uninterrupted reference run):

- Two trainers started at the same moment on one directory: one trains,
  the other exits 2 with one line; the winner's run is the solo run, bit
  for bit.
- The disk fills up during training (a small tmpfs the test mounts, then
  fills): one line, no temporary checkpoint left, the earlier checkpoints
  load; once there is room, --resume ends as the uninterrupted run ends.
- A failed save whose writer thread goes on after the error (orbax raises
  the first failed write while the others run) leaves no temporary either.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_reliability as reliability
from helpers import REPO
from test_reliability import STEPS, assert_same_run, complete_steps

from gptcore.run import RunError
from jaxgpt.train_checkpoints import Checkpoints

preset, through = reliability.preset, reliability.through  # its fixtures, made again for this module

TRAINERS = {"jaxgpt": "jaxgpt.train", "torchgpt": "torchgpt.train"}


def trainer(module: str, preset: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, "--config", str(preset), f"train.out_dir={run}", *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def error_lines(err: str) -> list[str]:
    """stderr without the progress bar's redraws."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
            and "s/it" not in line]


def test_two_trainers_started_together_one_trains(preset, through, tmp_path):
    run = tmp_path / "run"
    procs = [trainer("jaxgpt.train", preset, run) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, errs)
    loser = error_lines(errs[[p.returncode for p in procs].index(2)])
    assert len(loser) == 1 and loser[0].startswith("error: "), loser
    assert any(s in loser[0] for s in ("is in use by process", "already holds a run", "is not empty")), loser
    assert_same_run(run, through)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root can mount; this machine's CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", f"jaxgpt-test-{uuid.uuid4().hex[:8]}",
                           str(mount)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> Path:
    """Write zeros until the filesystem has no room left. Unbuffered: a
    buffered file keeps the bytes a short write left over and raises ENOSPC
    again when it is closed (which failed a CI run)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_full_disk_is_one_line_and_resume_continues(name, preset, through, small_disk):
    run = small_disk / "run"
    proc = trainer(TRAINERS[name], preset, run)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (complete_steps(run) or
                                                                   (run / "checkpoints" / "latest.pt").exists()):
        time.sleep(0.01)
    filler = fill(small_disk)
    _, err = proc.communicate(timeout=120)
    lines = error_lines(err)
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, err[-3000:])
    assert lines[0].startswith("error: ") and ("the disk is full" in lines[0] or "No space left" in lines[0]), lines
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers, leftovers
    filler.unlink()
    resumed = trainer(TRAINERS[name], preset, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    if name == "jaxgpt":
        assert_same_run(run, through)
    else:
        import torch
        assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == STEPS


def test_a_writer_that_outlives_a_failed_save_leaves_no_temporary(tmp_path, monkeypatch):
    """The race that left 4.orbax-checkpoint-tmp behind in a CI run: the
    save raises ENOSPC at once, while a writer it started creates the
    temporary directory 0.3 s later."""
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    writers = []

    def save(step, args, force):
        def write():
            time.sleep(0.3)
            (checkpoints.directory / f"{step}.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
            (checkpoints.directory / f"{step}.orbax-checkpoint-tmp" / "state" / "shard").write_bytes(b"\0" * 64)
        writers.append(threading.Thread(target=write))
        writers[-1].start()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.manager, "save", save)
    with pytest.raises(RunError, match="the disk is full"):
        checkpoints.save(SimpleNamespace(step=4, params={}, opt_state={}), {}, best=False)
    assert not writers[0].is_alive()  # waited for, not left running
    assert list(checkpoints.directory.iterdir()) == []
