"""A training run's checkpoints in jaxgpt: OUT_DIR/checkpoints, an orbax
CheckpointManager of the train state (step, params, opt_state) and the
loop's own state (early stopping), one directory per step.

Parallel text: torchgpt/train_checkpoints.py (latest.pt and best.pt).
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptcore.errors import checkpoint_write_failed
from gptcore.model_dir import CheckpointError
from gptcore.run import RunError
from jaxgpt.step import TrainState

BEST = "checkpoint_is_best"  # in each checkpoint's loop JSON: the retention policy keeps the newest such
TEMPORARY = "*.orbax-checkpoint-tmp*"  # orbax writes a checkpoint here, then renames it
SETTLE_S = 30.0  # how long a failed save waits for the writer threads it started


class Checkpoints:
    """OUT_DIR/checkpoints: an orbax CheckpointManager of the train state
    (step, params, opt_state) plus a JSON record of the loop's own state
    (early stopping). Keeps the latest `keep` checkpoints and the best one
    by val loss, across resumes. A checkpoint that exists is complete: orbax writes into a
    temporary directory and renames it, and removes older ones only after.
    Asynchronous saves copy the arrays off the devices and return; the
    files are written by a background thread, waited for before the next
    save, any read, and close. Each process writes and reads only its own
    shards."""

    def __init__(self, directory: Path, keep: int, asynchronous: bool = False):
        # retention is ours (prune): orbax's BestN knows the metrics of the checkpoints this process
        # saved, not those of a run it resumes, and would keep every one of those forever
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True)
        self.directory = directory.absolute()
        self.keep, self.asynchronous = keep, asynchronous
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        quiet_orbax_failures()

    def latest_step(self) -> int | None:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.wait_until_finished()
        return list(self.manager.all_steps())

    def save(self, state: TrainState, loop_state: dict, best: bool) -> None:
        """A checkpoint of `state` (best: the best val loss so far, kept
        while newer ones come and go); a save that fails (a full disk, say;
        with asynchronous saves, the previous one's failure shows here)
        removes its temporary directory and is one line, the earlier
        checkpoints intact."""
        step = int(state.step)
        arrays = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        before = set(threading.enumerate())
        try:
            self.manager.wait_until_finished()
            self.prune()
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                            loop=ocp.args.JsonSave({**loop_state, BEST: best})),
                              force=True)
            if not self.asynchronous:
                self.manager.wait_until_finished()
                self.prune()
        except Exception as e:  # orbax and tensorstore wrap the OSError in their own types
            raise self._failed_save(e, set(threading.enumerate()) - before) from None

    def prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints and the
        newest one saved as the best, whichever process saved them."""
        steps = sorted(self.manager.all_steps())
        best = [s for s in steps if self._loop_json(s).get(BEST) is True][-1:]
        for step in steps:
            if step not in steps[-self.keep:] and step not in best:
                self.manager.delete(step)

    def _loop_json(self, step: int) -> dict:
        try:
            return json.loads((self.directory / str(step) / "loop" / "metadata").read_text())
        except (OSError, ValueError):
            return {}

    def _failed_save(self, e: Exception, writers: set[threading.Thread]) -> RunError:
        """Orbax raises the first failed write while its other writers go on
        (and may create the temporary directory again): wait for the threads
        the save started, then remove its temporaries, and once more when the
        process ends, after Python has joined any thread still writing."""
        deadline = time.monotonic() + SETTLE_S
        for thread in writers:
            if thread.is_alive():  # not one still starting: join() refuses those
                thread.join(max(0.0, deadline - time.monotonic()))
        remove_temporaries(self.directory)
        atexit.register(remove_temporaries, self.directory)
        return checkpoint_write_failed(f"a checkpoint in {self.directory}", e, self.directory)

    def restore(self, state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The checkpointed state (arrays placed like `state`'s) and loop
        state of `step`, by default of the newest checkpoint that reads back.
        Newer ones that do not (cut short by a crash or a full disk) are
        renamed STEP.corrupt-TIME with a warning, never deleted; if none reads
        back (a different model config, say), nothing is renamed."""
        if step is not None:
            return self._restore(state, step)
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self._restore(state, step)
            except Exception as e:  # orbax raises many types for missing or truncated files
                failed.append((step, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
                continue
            for bad, why in failed:
                aside = self.directory / f"{bad}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(bad)).rename(aside)
                print(f"warning: checkpoint {bad} is unreadable ({why}); moved it to {aside}, resuming from "
                      f"step {step}", file=sys.stderr)
            self.manager.reload()
            return restored
        if not failed:
            raise RunError(f"--resume: no complete checkpoint in {self.directory} (nothing to resume)")
        raise RunError(f"--resume: no checkpoint in {self.directory} can be restored into this run's "
                                f"model (newest, step {failed[0][0]}: {failed[0][1]})")

    def _restore(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        self.manager.wait_until_finished()
        target = jax.tree_util.tree_map(_target, {"step": state.step, "params": state.params,
                                                  "opt_state": state.opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      loop=ocp.args.JsonRestore()))
        arrays = restored["state"]
        want, got = ({jax.tree_util.keystr(k): np.shape(a) for k, a in jax.tree_util.tree_leaves_with_path(tree)}
                     for tree in (target, arrays))
        if got != want:  # orbax restores the saved shapes, whatever the target's
            key = next(k for k in {**want, **got} if want.get(k) != got.get(k))
            raise CheckpointError(f"{key} has shape {got.get(key)}, this run's model has {want.get(key)}")
        loop_state = {k: v for k, v in dict(restored["loop"]).items() if k != BEST}
        return state.replace(step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"]), loop_state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.prune()
        self.manager.close()


def remove_temporaries(directory: Path) -> None:
    for tmp in directory.glob(TEMPORARY):
        shutil.rmtree(tmp, ignore_errors=True)


def _target(a):
    """Where orbax restores a leaf of `a`'s kind: a device array into its
    sharding (each process reads only its shards: no full host copy), a host
    array into host memory."""
    if isinstance(a, jax.Array):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
    return np.zeros(np.shape(a), np.asarray(a).dtype)


def quiet_orbax_failures() -> None:
    """A failed save is reported once, by Checkpoints.save, in one line: the
    tracebacks orbax's worker threads log (absl ERROR records) and print
    (asyncio callbacks on a loop the failure closed) are dropped."""
    for logger in map(logging.getLogger, ("absl", "asyncio")):
        if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
            logger.addFilter(_OrbaxErrors())
    if getattr(sys.unraisablehook, "quiet_closed_loops", False):
        return
    hooks = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not closed_loop(value):
            hooks[0](kind, value, tb)

    def unraisablehook(unraisable):
        if not closed_loop(unraisable.exc_value):
            hooks[1](unraisable)
    excepthook.quiet_closed_loops = unraisablehook.quiet_closed_loops = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def closed_loop(e) -> bool:
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


class _OrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # raised in orbax (absl), or an orbax task's (asyncio: its code or its temporary checkpoint named)
        return not (record.levelno >= logging.ERROR and ("orbax" in record.pathname or "orbax" in record.getMessage()))
