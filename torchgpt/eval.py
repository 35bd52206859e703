"""`python -m torchgpt.eval --checkpoint DIR [data.corpus=PATH] [--split val]`:
a saved model's loss, perplexity and bits per byte on a text.

Parallel text: jaxgpt/eval.py; the command itself is gptcore/evaluation.py.
The model runs in float32 in eval mode (no dropout), without gradients.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from gptcore.evaluation import run_eval
from torchgpt import ops
from torchgpt.model import GPT


def _load(directory: str):
    from torchgpt.checkpoint import load_model
    cfg, model, tokenizer_path = load_model(directory)
    return cfg, model, tokenizer_path


@torch.no_grad()
def nll_sum(model: GPT, x, y, valid) -> float:  # (B, T) x3 -> summed nll
    x, y, valid = (torch.from_numpy(a) for a in (x, y, valid))
    logits = model(x.long(), valid=valid).logits
    return float(ops.cross_entropy(logits, y.long(), valid) * valid.sum())


def main(argv: Sequence[str] | None = None) -> int:
    return run_eval(argv, "python -m torchgpt.eval", _load, nll_sum)


if __name__ == "__main__":
    sys.exit(main())
