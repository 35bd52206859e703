"""torch .pt files. Reading or writing one needs torch installed; torch is
imported inside the functions, so the rest of gptcore (and jaxgpt) never
imports it.

Files are always loaded with `torch.load(weights_only=True)`: the unpickler
then builds only tensors and plain containers, so a .pt carrying a malicious
pickle is refused instead of run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from gptcore.formats import FormatError


def load(path: str | Path):
    """The object in a .pt file, its tensors as numpy arrays (memory-mapped where torch can)."""
    try:
        import torch
    except ImportError:
        raise FormatError(f"{path}: reading .pt files needs torch installed") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files from before torch's zip format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise FormatError(f"{path}: cannot load as a weights-only torch checkpoint ({first})") from None
    return _to_numpy(obj, torch)


def _to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v, torch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v, torch) for v in obj)
    return obj


def save(path: str | Path, meta: dict, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """torch.save({**meta, "model": {name: tensor}}) to `path`."""
    try:
        import torch
    except ImportError:
        raise FormatError(f"{path}: writing .pt files needs torch installed") from None
    state = {}
    for name, a in tensors:
        a = np.ascontiguousarray(a)
        a = a if a.flags.writeable else a.copy()  # torch.from_numpy wants writable memory
        if a.dtype == ml_dtypes.bfloat16:
            state[name] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(a)
    with open(path, "wb") as f:  # an OSError naming the path, not torch's RuntimeError
        torch.save({**meta, "model": state}, f)
