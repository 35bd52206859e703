"""safetensors files: a lazy reader and a streaming writer (numpy, bf16 via ml_dtypes).

The writer takes (name, array) pairs one at a time and never holds more than
one: tensor bytes go to a side file while the header is collected, then the
header and the bytes are joined. The layout is the safetensors spec's: an
8-byte little-endian header length, the JSON header (padded with spaces to a
multiple of 8), then the tensors back to back.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from gptcore.formats import FormatError

_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
           np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(bool): "BOOL"}


class SafetensorsFile(Mapping):
    """The tensors of a .safetensors file, each read from disk when accessed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for foreign / truncated files
            raise FormatError(f"{self.path}: not a safetensors file ({str(e).splitlines()[0]})") from None
        self._keys = list(self._file.keys())
        self.metadata = self._file.metadata() or {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._keys:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._file.get_slice(name).get_shape())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class ShardedSafetensors(Mapping):
    """HF's sharded layout: model.safetensors.index.json {"weight_map": {name: file}}."""

    def __init__(self, index: str | Path):
        index = Path(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: unreadable shard index ({e.__class__.__name__}: {e})") from None
        files = {f: SafetensorsFile(index.parent / f) for f in dict.fromkeys(weight_map.values())}
        self._where = {name: files[f] for name, f in weight_map.items()}

    def __getitem__(self, name):
        return self._where[name][name]

    def shape(self, name):
        return self._where[name].shape(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def write(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write (name, array) pairs to `path`, one tensor in memory at a time."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    header, offset = {}, 0
    try:
        with open(data, "wb") as f:
            for name, a in tensors:
                a = np.ascontiguousarray(a)
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                if a.dtype not in _DTYPES:
                    raise FormatError(f"weight {name!r}: dtype {a.dtype} has no safetensors code")
                header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                                "data_offsets": [offset, offset + a.nbytes]}
                a.tofile(f)
                offset += a.nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            with open(data, "rb") as f:
                shutil.copyfileobj(f, out)
    finally:
        data.unlink(missing_ok=True)
