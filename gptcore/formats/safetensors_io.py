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

from gptcore.formats import FormatError

_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
           np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(bool): "BOOL"}


_CODES = {code: dtype for dtype, code in _DTYPES.items()}


class SafetensorsFile(Mapping):
    """The tensors of a .safetensors file, each read from disk when accessed,
    with plain reads rather than a memory map: pages a map has touched stay
    in the process's memory, so converting a file would hold all of it; a
    read holds one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8 or n > 100 * 2**20:
                    raise ValueError(f"header length {n} does not fit the file")
                header = json.loads(f.read(n))
            self.metadata = header.pop("__metadata__", None) or {}
            self._entries = {name: (_CODES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                             for name, e in header.items()}
            self._base = 8 + n
            if any(self._base + stop > size or start > stop for _, _, start, stop in self._entries.values()):
                raise ValueError("a tensor's data lies past the end of the file (truncated?)")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise FormatError(f"{self.path}: not a safetensors file ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, start, stop = self._entries[name]
        data = np.empty(stop - start, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            if f.readinto(data) != data.nbytes:
                raise FormatError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
        return data.view(dtype).reshape(shape)

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


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
    writer = _Writer(Path(path))
    try:
        for name, a in tensors:
            writer.add(name, a)
        writer.finish(metadata)
    finally:
        writer.discard()


class _Writer:
    """One safetensors file written as tensors arrive: their bytes go to a
    side file (PATH.data) at once, the header and the bytes to PATH at finish."""

    def __init__(self, path: Path):
        self.path, self.data = path, path.with_name(path.name + ".data")
        self.header, self.nbytes = {}, 0
        self.f = open(self.data, "wb")

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in _DTYPES:
            raise FormatError(f"weight {name!r}: dtype {a.dtype} has no safetensors code")
        self.header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                             "data_offsets": [self.nbytes, self.nbytes + a.nbytes]}
        a.tofile(self.f)
        self.nbytes += a.nbytes

    def finish(self, metadata: dict[str, str] | None) -> None:
        self.f.close()
        header = {**self.header, **({"__metadata__": metadata} if metadata else {})}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            with open(self.data, "rb") as f:
                shutil.copyfileobj(f, out)

    def discard(self) -> None:
        self.f.close()
        self.data.unlink(missing_ok=True)


def write_sharded(directory: Path, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Hugging Face's layout: one model.safetensors when everything fits in
    max_shard_bytes, else model-0000i-of-0000n.safetensors, each closed
    before the tensor that would take it past the limit (a tensor larger
    than the limit gets a shard of its own), and model.safetensors.index.json
    mapping every name to its file. One tensor in memory at a time. Returns
    the files written."""
    shards: list[tuple[Path, list[str]]] = []
    writer, total = None, 0
    try:
        for name, a in tensors:
            a = np.asarray(a)
            if writer is not None and writer.header and writer.nbytes + a.nbytes > max_shard_bytes:
                writer.finish(metadata)
                writer.discard()
                writer = None
            if writer is None:
                writer = _Writer(directory / f".shard-{len(shards):05d}.tmp")
                shards.append((writer.path, []))
            writer.add(name, a)
            shards[-1][1].append(name)
            total += a.nbytes
        if writer is not None:
            writer.finish(metadata)
    finally:
        if writer is not None:
            writer.discard()
    if len(shards) == 1:
        shards[0][0].rename(directory / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, (path, members) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / name)
        weight_map.update(dict.fromkeys(members, name))
        names.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]
