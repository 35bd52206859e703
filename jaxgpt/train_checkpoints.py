"""A training run's checkpoints in jaxgpt: OUT_DIR/checkpoints, an orbax
CheckpointManager of the train state (step, params, opt_state) and the
loop's own state (early stopping), one directory per step.

Parallel text: torchgpt/train_checkpoints.py (latest.pt and best.pt).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptcore.model_dir import CheckpointError
from gptcore.run import RunError
from jaxgpt.step import TrainState


class Checkpoints:
    """OUT_DIR/checkpoints: an orbax CheckpointManager of the train state
    (step, params, opt_state) plus a JSON record of the loop's own state
    (early stopping). Keeps the latest `keep` checkpoints and the best one
    by val loss. A checkpoint that exists is complete: orbax writes into a
    temporary directory and renames it, and removes older ones only after.
    Asynchronous saves copy the arrays off the devices and return; the
    files are written by a background thread, waited for before the next
    save, any read, and close. Each process writes and reads only its own
    shards."""

    def __init__(self, directory: Path, keep: int, asynchronous: bool = False):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=True)
        self.directory = directory.absolute()
        self.asynchronous = asynchronous
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.wait_until_finished()
        return list(self.manager.all_steps())

    def save(self, state: TrainState, loop_state: dict, val_loss: float) -> None:
        step = int(state.step)
        arrays = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                        loop=ocp.args.JsonSave(loop_state)),
                          metrics={"val_loss": val_loss}, force=True)
        if not self.asynchronous:
            self.manager.wait_until_finished()

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
        return state.replace(step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"]), \
            dict(restored["loop"])

    def close(self) -> None:
        self.manager.close()


def _target(a):
    """Where orbax restores a leaf of `a`'s kind: a device array into its
    sharding (each process reads only its shards: no full host copy), a host
    array into host memory."""
    if isinstance(a, jax.Array):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
    return np.zeros(np.shape(a), np.asarray(a).dtype)
