"""A training run's checkpoints in torchgpt: OUT_DIR/checkpoints/latest.pt
(after every evaluation) and best.pt (the best val loss so far), each with
the model, optimizer and RNG state, the step and the loop's own state.

Parallel text: jaxgpt/train_checkpoints.py (orbax, one directory per step).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gptcore.errors import checkpoint_write_failed
from gptcore.run import RunError


def save_checkpoint(path: Path, model, optimizer, step: int, loop_state: dict) -> None:
    """Atomically: model, optimizer and RNG state, step, the loop's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng": torch.get_rng_state(), "loop": loop_state}, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        raise checkpoint_write_failed(str(path), e, path.parent) from None


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, dict]:
    """weights_only: a checkpoint is data, never code to unpickle."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["loop"]


def resume_checkpoint(directory: Path, model, optimizer) -> tuple[int, dict]:
    """latest.pt, or best.pt (with a warning) when latest.pt does not read
    back; neither file is modified."""
    failed = []
    for name in ("latest.pt", "best.pt"):
        if not (directory / name).is_file():
            continue
        try:
            step, loop_state = load_checkpoint(directory / name, model, optimizer)
        except Exception as e:  # truncated file (RuntimeError, EOFError, ...) or another model's weights
            failed.append(f"{name}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
            continue
        if failed:
            print(f"warning: {failed[0]}; resuming from {name} (step {step})", file=sys.stderr)
        return step, loop_state
    raise RunError(f"--resume: no checkpoint in {directory} can be restored into this run's model "
                   f"({'; '.join(failed) or 'no latest.pt or best.pt'})")
