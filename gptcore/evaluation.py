"""The `python -m {jaxgpt,torchgpt}.eval` command: a saved model's loss,
perplexity and bits per byte on a text, framework-free; each twin supplies
how to load a model directory and the summed nll of a batch.

The text (data.corpus, as in training) is prepared by gptcore.prepare exactly
as a training run prepares it, so `--split val` is the run's own validation
tokens; data.tokens=DIR evaluates a prepared token dataset. Every token after the first is predicted once: windows of
context_length start at 0, T, 2T, ... (a window's first predictions see
little context, as in training's evaluation). bits per byte = the summed
nll in bits / the UTF-8 bytes of the evaluated tokens' text.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gptcore.cli import Parser, guarded
from gptcore.errors import UserError
from gptcore.model_dir import load_with_tokenizer
from gptcore.prepare import prepare
from gptcore.presets import apply_override, build_section
from gptcore.shards import ShardedTokens

# (model directory) -> (model config, whatever nll_sum takes as its model, tokenizer.json path or None)
Loader = Callable[[str], tuple]
# (model, x (B, T) int32, y (B, T) int32, valid (B, T) bool) -> summed nll (nats) over the valid positions
NllSum = Callable[..., float]
SPLITS = ("all", "train", "val")


class EvalError(UserError):
    pass


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Loss, perplexity and bits per byte of a saved model on a text.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory, or a run directory holding one")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="the whole text, or the train / val part a run on it would use (data.val_fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="the text, as training reads it: data.corpus=PATH (default: the offline Shakespeare)")
    return p


def windows(tokens: np.ndarray, T: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, valid) batches of (batch, T) predicting tokens[1:] once each;
    the last window is padded (valid False)."""
    starts = range(0, len(tokens) - 1, T)
    for i in range(0, len(starts), batch):
        x = np.zeros((len(starts[i:i + batch]), T), np.int32)
        y, valid = np.zeros_like(x), np.zeros(x.shape, bool)
        for row, s in enumerate(starts[i:i + batch]):
            n = min(T, len(tokens) - 1 - s)
            x[row, :n], y[row, :n], valid[row, :n] = tokens[s:s + n], tokens[s + 1:s + n + 1], True
        yield x, y, valid


def evaluate_text(args: argparse.Namespace, load: Loader, nll_sum: NllSum) -> dict:
    """The command's work: the numbers it prints."""
    from tqdm import tqdm

    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    tables: dict = {}
    for text in args.overrides:
        if not text.startswith("data."):
            raise EvalError(f"override {text!r}: eval takes data.* keys only (data.corpus=PATH)")
        apply_override(tables, text)
    data = build_section("data", tables.get("data", {}), "command line")
    cfg, model, tokenizer = load_with_tokenizer(load, args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(data.tokens).expanduser() if data.tokens else Path(tmp)
        if not data.tokens:
            prepare(data.corpus, tokenizer, directory, text_field=data.text_field, cache_dir=data.cache_dir,
                    val_fraction=data.val_fraction, val_split=data.val_split, num_proc=data.num_proc or None)
        parts = [ShardedTokens(directory, split) for split in ("train", "val") if args.split in (split, "all")]
        tokens = np.concatenate([p[np.arange(min(len(p), args.max_tokens or len(p)))] for p in parts])
    tokens = tokens[:args.max_tokens]
    if len(tokens) < 2:
        raise EvalError(f"the {args.split} split of {data.corpus} has {len(tokens)} tokens: nothing to predict")
    T = cfg.context_length
    total = 0.0
    for x, y, valid in tqdm(windows(tokens, T, args.batch_size), total=math.ceil((len(tokens) - 1) / T /
                            args.batch_size), desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True):
        total += nll_sum(model, x, y, valid)
    n = len(tokens) - 1
    n_bytes = len(tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": total / math.log(2) / n_bytes,
            "tokens": n, "bytes": n_bytes}


def run_eval(argv: Sequence[str] | None, prog: str, load: Loader, nll_sum: NllSum) -> int:
    """The `python -m {jaxgpt,torchgpt}.eval` command; returns the exit status."""
    args = build_parser(prog).parse_args(argv)

    def body() -> None:
        r = evaluate_text(args, load, nll_sum)
        print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}  "
              f"({r['tokens']:,} tokens predicted, {r['bytes']:,} bytes, split {args.split})")

    return guarded(body)
