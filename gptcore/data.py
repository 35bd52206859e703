"""The data pipeline shared by both trainers, in numpy only.

    text   = corpus_from_spec("shakespeare", cache_dir)       # gptcore.corpus
    meta   = prepare_tokens(text, tokenizer, out_dir)         # train.bin / val.bin, once
    tokens = load_tokens(out_dir, "train")                    # np.memmap (N,)
    x, y   = RandomWindows(tokens, T, B, seed).batch(step)    # int32 (B, T) each

Every sampler is a pure function of (seed, step), so a resumed run draws exactly
the batches it would have drawn without the interruption.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gptcore.errors import UserError, write_atomic
from gptcore.tokenizer import Tokenizer

SPLITS = ("train", "val")
IGNORE_INDEX = -1  # target id at padded positions; the loss skips them
_CHUNK_CHARS = 1 << 16  # characters per encode call: bounds the Python int lists
_CHUNKS_PER_BATCH = 16  # chunks per encode_batch call (HF encodes them in parallel)


class DataError(UserError):
    """A corpus, token file or sampler request that cannot work. One line."""


# -- token files ------------------------------------------------------------------
def prepare_tokens(text: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                   *, chunk_chars: int = _CHUNK_CHARS) -> dict:
    """Encode `text` once into out_dir/train.bin and val.bin (flat uint16, or
    uint32 for vocabularies of 65536 or more) and out_dir/meta.json; returns the
    meta dict. val.bin holds the last `val_fraction` of the token stream
    (rounded down), as in nanoGPT. Files whose meta matches this text, tokenizer
    and val_fraction are reused; anything else is rebuilt.

    The text is encoded in chunks of about `chunk_chars` characters, cut only
    after a "\\n" that has a non-space on both sides: byte-level BPE never
    merges across such a cut, so the stream equals `tokenizer.encode(text)`."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not text:
        raise DataError("cannot prepare tokens from an empty corpus")
    out = Path(out_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    identity = {
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokenizer_sha256": tokenizer.fingerprint,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
    }
    meta = _read_meta(out)
    if meta is not None and all(meta.get(k) == v for k, v in identity.items()) and _files_match(out, meta):
        return meta

    tokenizer.check(text, what="corpus")  # one error in corpus coordinates, before any work
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a half-rebuilt directory must never look current
    tmp = out / ".tokens.tmp"
    chunks = _chunks(text, chunk_chars)
    with open(tmp, "wb") as f:
        n = _write_ids(f, [tokenizer.encode(next(chunks))], dtype)
        while batch := list(itertools.islice(chunks, _CHUNKS_PER_BATCH)):
            n += _write_ids(f, tokenizer.encode_batch(batch, start=False), dtype)

    n_val = int(n * val_fraction)
    n_train = n - n_val
    stream = np.memmap(tmp, dtype=dtype, mode="r", shape=(n,))
    val_tmp = out / ".val.tmp"
    stream[n_train:].tofile(val_tmp)
    del stream
    os.truncate(tmp, n_train * dtype.itemsize)  # the head of the stream is train.bin as it stands
    os.replace(tmp, out / "train.bin")
    os.replace(val_tmp, out / "val.bin")
    meta = {**identity, "train_tokens": n_train, "val_tokens": n_val, "corpus_chars": len(text)}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each at least `chunk_chars` long (but the
    last), cut only at `_SAFE_CUT`; yields at least one piece."""
    begin = 0
    while True:
        cut = _SAFE_CUT.search(text, begin + chunk_chars) if begin + chunk_chars < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[begin:end]
        if end == len(text):
            return
        begin = end


def _write_ids(f: BinaryIO, ids_lists: Sequence[list[int]], dtype: np.dtype) -> int:
    count = 0
    for ids in ids_lists:
        np.asarray(ids, dtype=dtype).tofile(f)
        count += len(ids)
    return count


def _read_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files_match(out: Path, meta: dict) -> bool:
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {split: meta[f"{split}_tokens"] * itemsize for split in SPLITS}
    except (KeyError, TypeError):  # a meta.json from elsewhere
        return False
    return all((out / f"{split}.bin").is_file() and (out / f"{split}.bin").stat().st_size == size
               for split, size in sizes.items())


def load_tokens(out_dir: str | Path, split: str) -> np.ndarray:
    """The `split` ("train" or "val") token stream written by prepare_tokens:
    a read-only np.memmap (N,), or an empty array when the split has no tokens."""
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    out = Path(out_dir)
    meta = _read_meta(out)
    if meta is None:
        raise DataError(f"no meta.json in {out}: run prepare_tokens first")
    if not _files_match(out, meta):
        raise DataError(f"token files in {out} do not match meta.json: run prepare_tokens again")
    count = meta[f"{split}_tokens"]
    if count == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(count,))


# -- batch samplers ---------------------------------------------------------------
class _Windows:
    """Shared checks and gathering of (x, y) windows from a token stream."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, split: str):
        if not getattr(tokens, "lazy_tokens", False):  # gptcore.prepare.ShardedTokens reads only what it is asked
            tokens = np.asarray(tokens)  # a memmap stays a view of the file
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{split} tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if len(tokens) < block_size + 1:
            raise DataError(f"the {split} split has {len(tokens)} tokens, but a window of block_size {block_size} "
                            f"needs {block_size + 1}: use a longer corpus or a smaller block size")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.split = split

    def _gather(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """starts (B,) -> x, y int32 (B, T) with y[:, t] == x[:, t + 1]."""
        index = starts[:, None] + np.arange(self.block_size + 1)  # (B, T+1)
        window = self.tokens[index].astype(np.int32)  # (B, T+1)
        return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])


def _check_step(step: int) -> None:
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")


class RandomWindows(_Windows):
    """nanoGPT's get_batch: B windows at uniformly random offsets.

    `batch(step)` draws the offsets from np.random.default_rng((seed, step)), so
    any step's batch is reproducible without replaying the steps before it."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, split: str = "train"):
        super().__init__(tokens, block_size, batch_size, split)
        self.seed = seed

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x."""
        _check_step(step)
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # (B,)
        return self._gather(starts)


class SlidingWindows(_Windows):
    """Seed 003's dataset: windows starting at 0, stride, 2 * stride, ... (every
    start leaving room for the shifted target), batched with drop_last; each
    epoch visits them in a fresh order drawn from default_rng((seed, epoch)),
    or in stream order when shuffle is False.

    `batch(step)` is random access: step // steps_per_epoch is the epoch."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, stride: int, seed: int,
                 shuffle: bool = True, split: str = "train"):
        super().__init__(tokens, block_size, batch_size, split)
        if stride < 1:
            raise DataError(f"stride must be positive, got {stride}")
        self.starts = np.arange(0, len(tokens) - block_size, stride)  # (n_windows,)
        self.steps_per_epoch = len(self.starts) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the {split} split has {len(tokens)} tokens: {len(self.starts)} windows of block_size "
                            f"{block_size} at stride {stride}, fewer than one batch of {batch_size}")
        self.stride = stride
        self.seed = seed
        self.shuffle = shuffle
        self._order_epoch = -1
        self._order = self.starts

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x."""
        _check_step(step)
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return self._gather(order[i * self.batch_size:(i + 1) * self.batch_size])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Window starts in the order epoch `epoch` visits them (cached: steps
        arrive in order, and a permutation costs O(n_windows))."""
        if self.shuffle and epoch != self._order_epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.starts)
            self._order_epoch = epoch
        return self._order


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int,
                 split: str = "val") -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of n_batches (x, y) int32 (B, T) random-window batches, the
    same on every call, so successive val losses are comparable."""
    sampler = RandomWindows(tokens, block_size, batch_size, seed, split=split)
    return [sampler.batch(i) for i in range(n_batches)]


def pad_batch(seqs: Sequence[Sequence[int]], block_size: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of one sequence per row, for variable-length examples.

    Each sequence (at least 2 tokens; cut to its first block_size + 1) gives
    x = seq[:-1], y = seq[1:] left-aligned in a row of T = block_size. Returns
    x int32 (B, T) with `pad_id` after the sequence, y int32 (B, T) with
    IGNORE_INDEX (-1) there, and valid bool (B, T), False at padded positions.
    pad_id only fills x: with a tokenizer that has no pad token any id will do."""
    if not seqs:
        raise DataError("pad_batch needs at least one sequence")
    x = np.full((len(seqs), block_size), pad_id, dtype=np.int32)  # (B, T)
    y = np.full((len(seqs), block_size), IGNORE_INDEX, dtype=np.int32)  # (B, T)
    valid = np.zeros((len(seqs), block_size), dtype=bool)  # (B, T)
    for b, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        if seq.ndim != 1 or len(seq) < 2:
            raise DataError(f"sequence {b} has {seq.size} token(s); a training pair needs at least 2")
        seq = seq[:block_size + 1]
        n = len(seq) - 1
        x[b, :n] = seq[:-1]
        y[b, :n] = seq[1:]
        valid[b, :n] = True
    return x, y, valid
