"""`python -m jaxgpt.eval --checkpoint DIR [data.corpus=PATH] [--split val]`:
a saved model's loss, perplexity and bits per byte on a text.

Parallel text: torchgpt/eval.py; the command itself is gptcore/evaluation.py.
The model runs with the reference kernels in float32, one jitted forward
per batch shape.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from gptcore.evaluation import run_eval
from jaxgpt import ops
from jaxgpt.model import GPT


def _load(directory: str):
    from jaxgpt.checkpoint import load_model
    cfg, params, tokenizer_path = load_model(directory)
    return cfg, (GPT(cfg), params), tokenizer_path


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model: GPT, params, x, y, valid):  # (B, T) x3 -> ()
    logits = model.apply({"params": params}, x, valid=valid).logits
    return ops.cross_entropy(logits, y, valid) * valid.sum()


def nll_sum(model, x, y, valid) -> float:
    module, params = model
    return float(_nll_sum(module, params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)))


def main(argv: Sequence[str] | None = None) -> int:
    return run_eval(argv, "python -m jaxgpt.eval", _load, nll_sum)


if __name__ == "__main__":
    sys.exit(main())
