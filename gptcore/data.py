"""The batches both trainers draw from a token stream, in numpy only.

    prepare(spec, tokenizer, out_dir)                         # gptcore.prepare: a token dataset, once
    tokens = ShardedTokens(out_dir, "train")                  # gptcore.shards: its train split, memory-mapped (N,)
    x, y   = RandomWindows(tokens, T, B, seed).batch(step)    # int32 (B, T) each

Every sampler is a pure function of (seed, step), so a resumed run draws exactly
the batches it would have drawn without the interruption.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gptcore.errors import UserError

IGNORE_INDEX = -1  # target id at padded positions; the loss skips them


class DataError(UserError):
    """A corpus, token file or sampler request that cannot work. One line."""


# -- batch samplers ---------------------------------------------------------------
class _Windows:
    """Shared checks and gathering of (x, y) windows from a token stream."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, split: str):
        if not getattr(tokens, "lazy_tokens", False):  # gptcore.shards.ShardedTokens reads only what it is asked
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

    def batch(self, step: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x; with `rows`, only those rows of the batch."""
        _check_step(step)
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # (B,)
        return self._gather(starts if rows is None else starts[rows])


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

    def batch(self, step: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x; with `rows`, only those rows of the batch."""
        _check_step(step)
        epoch, i = divmod(step, self.steps_per_epoch)
        starts = self._epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]  # (B,)
        return self._gather(starts if rows is None else starts[rows])

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
