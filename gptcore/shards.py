"""Reading a token dataset (written by gptcore.prepare): its manifest,
checked, and a split as one memory-mapped token sequence.

    tokens = ShardedTokens("tokens/", "train")    # len(tokens), tokens[index array]
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gptcore.corpus import sha256_file
from gptcore.data import DataError

MANIFEST = "manifest.json"
FORMAT = "jaxgpt-tokens-2"
VERIFIED = ".verified.json"  # {file: [size, mtime_ns, inode, sha256]} of the files whose checksums last matched
RACY_NS = 2_000_000_000  # a file modified this recently may change again within its mtime's tick: not recorded


def read_manifest(directory: str | Path, verify: bool = False, quiet: bool = False) -> dict | None:
    """The manifest of a token dataset; with verify, each file's sha256
    checked (its size always). A missing or broken one: None when quiet,
    else a DataError saying to prepare it again (nothing is deleted).
    Checks that pass are recorded (VERIFIED): a file whose size, mtime and
    inode are those of its last passing check is not read again."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        sizes = {}
        for f in manifest["files"]:
            path = directory / f["file"]
            sizes[f["file"]] = f["tokens"]
            if path.stat().st_size != f["tokens"] * itemsize:
                raise ValueError(f"{f['file']} has {path.stat().st_size} bytes, the manifest says "
                                 f"{f['tokens'] * itemsize}")
        if verify:
            _verify(directory, manifest["files"])
        for split in manifest["splits"].values():
            for s in split["shards"]:
                if not 0 <= s["offset"] <= s["offset"] + s["tokens"] <= sizes[s["file"]]:
                    raise ValueError(f"a slice of {s['file']} lies outside it")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if quiet:
            return None
        raise DataError(f"{directory}: not a usable token dataset ({e}); prepare it again") from None
    return manifest


def _verify(directory: Path, files: list[dict]) -> None:
    """Each file's sha256 against the manifest's, skipping those VERIFIED
    says passed with the same (size, mtime, inode); the passes are recorded
    where the directory can be written (a read-only dataset is hashed each time)."""
    try:
        record = json.loads((directory / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    passed, now = {}, time.time_ns()
    for f in files:
        stat = (directory / f["file"]).stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino, f["sha256"]]
        if record.get(f["file"]) != stamp and sha256_file(directory / f["file"]) != f["sha256"]:
            raise ValueError(f"{f['file']}: its checksum does not match the manifest")
        if now - stat.st_mtime_ns > RACY_NS:
            passed[f["file"]] = stamp
    if passed != record:
        try:  # a name of its own: processes of several hosts may check one shared dataset at once
            fd, temporary = tempfile.mkstemp(prefix=".verified.", suffix=".tmp", dir=directory)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(passed, f)
            os.replace(temporary, directory / VERIFIED)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


class ShardedTokens:
    """A split's slices of the files as one 1-D token sequence (memory-mapped,
    nothing read until indexed): len() and integer-array indexing, which is
    what the window samplers use."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        manifest = read_manifest(directory)
        self.dtype = np.dtype(manifest["dtype"])
        self.maps = [np.memmap(directory / s["file"], dtype=self.dtype, mode="r",
                               offset=s["offset"] * self.dtype.itemsize, shape=(s["tokens"],))
                     for s in manifest["splits"][split]["shards"] if s["tokens"]]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # (n_slices + 1,)
        self.ndim, self.lazy_tokens = 1, True

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1  # which slice holds each position
        out = np.empty(index.shape, self.dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self.maps[s][index[where] - self.offsets[s]]
        return out
