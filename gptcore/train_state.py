"""The portable train state: the latest checkpoint in a form both twins read.

Each trainer keeps its own checkpoints (jaxgpt: orbax, torchgpt: .pt files),
and neither framework reads the other's. So with `train.portable_state` on
(the default) every checkpoint also writes OUT_DIR/checkpoints/portable.safetensors:

    params/NAME   the weights                       }  by torchgpt state_dict name,
    adam_m/NAME   AdamW's first moment (exp_avg)     }  in torch's layout (Linear
    adam_v/NAME   AdamW's second moment (exp_avg_sq) }  weights (out, in))
    metadata      format, step (optimizer steps taken, = Adam's count), loop (the
                  loop's state: early stopping, last val loss), as JSON strings

and `--resume` in the other twin continues from it: params, both moments,
step, schedule and data position carry over (batches are functions of (seed,
step)). Dropout masks cannot: each framework draws its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptcore.errors import checkpoint_write_failed
from gptcore.formats import safetensors_io
from gptcore.model_dir import CheckpointError

FILENAME = "portable.safetensors"
FORMAT = "jaxgpt-train-state-1"
PARTS = ("params", "adam_m", "adam_v")


def write(directory: Path, step: int, params: dict, adam_m: dict, adam_v: dict, loop_state: dict) -> Path:
    """Atomically (a temporary sibling, renamed): a kill leaves the previous file."""
    path = directory / FILENAME
    tmp = path.with_name(f".{FILENAME}.tmp")
    tensors = ((f"{part}/{name}", np.asarray(a, np.float32))
               for part, tree in zip(PARTS, (params, adam_m, adam_v)) for name, a in tree.items())
    try:
        safetensors_io.write(tmp, tensors, {"format": FORMAT, "step": str(int(step)), "loop": json.dumps(loop_state)})
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise checkpoint_write_failed(str(path), e, directory) from None
    return path


def read(directory: Path) -> tuple[int, dict, dict, dict, dict]:
    """(step, params, adam_m, adam_v, loop state), each tree {torch name: float32 array}."""
    path = directory / FILENAME
    try:
        tensors = safetensors_io.SafetensorsFile(path)
        meta = tensors.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        step, loop_state = int(meta["step"]), json.loads(meta["loop"])
        trees = {part: {} for part in PARTS}
        for key in tensors:
            part, name = key.split("/", 1)
            trees[part][name] = np.array(tensors[key])  # a copy: the file is mapped, and replaced by the next save
    except Exception as e:  # missing, truncated or foreign file
        raise CheckpointError(f"--resume: {path} is not a readable train state ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return step, trees["params"], trees["adam_m"], trees["adam_v"], loop_state


def exists(directory: Path) -> bool:
    return (directory / FILENAME).is_file()
