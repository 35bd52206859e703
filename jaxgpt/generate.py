"""Autoregressive generation with a KV cache, in JAX.

Parallel text: torchgpt/generate.py (same functions, same order).

    tokens = generate(params, cfg, prompts, prompt_valid, max_new_tokens=100,
                      temperature=0.8, top_k=50, top_p=0.95, eos_id=eos, rng=key)

`generate` prefills the whole (left-padded) prompt batch in one forward call,
then runs a decode loop compiled once (`lax.while_loop`, one token per
iteration, stopping early when every sequence has emitted eos) that feeds
only the newest token and reads everything before it from the KV cache.

Batches of prompts of different lengths are left-padded with a valid mask.
The position of a token is the number of valid tokens before it, so a padded
prompt sees exactly the positions (and, padding being masked, the context)
it would see alone. After a sequence emits `eos_id` it emits `pad_id`
(default: eos_id) until the batch is done.

Sampling (`filter_logits`, shared conventions in gptcore/generation.py):
temperature 0 is greedy (argmax, lowest index among ties); top-k keeps every
token tied with the k-th largest logit; top-p keeps the smallest set of most
probable tokens whose cumulative probability reaches p, including the token
that crosses p and any ties of the last token kept.

The context limit. Positions are learned in some presets, so a token can
never sit at a position >= cfg.context_length. `generate` and
`generate_reference` keep every token at its true position: they raise
GenerationError before doing any work when prompt length + max_new_tokens >
context_length. `stream` (used by the CLI) serves any length with a sliding
window: prompts longer than the context keep their last context_length
tokens (nanoGPT's crop), and when the next segment of tokens would not fit,
the newest context_length // 2 tokens are re-encoded from position 0 in one
prefill call and decoding continues from that fresh cache. The model then
always sees between context_length // 2 and context_length tokens of
context, at the cost of one prefill per context_length // 2 new tokens.

CLI (prints the prompt, then streams the continuation):

    python -m jaxgpt.generate --checkpoint DIR --prompt "ROMEO:" --max-new-tokens 200 \
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0 --num-samples 2
    echo "text" | python -m jaxgpt.generate --checkpoint DIR --prompt -
    python -m jaxgpt.generate --checkpoint DIR --prompt-file prompt.txt

An empty prompt starts from [eos] (or "\\n" for tokenizers without one).

Shape legend: B batch, P prompt length, N new tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptcore.config import ModelConfig
from gptcore.generation import (
    STREAM_CHUNK,
    GenerationError,
    Sampling,
    check_request,
    check_sampling,
    run_cli,
)
from jaxgpt.model import GPT, Cache, init_cache

__all__ = ["GenerationError", "filter_logits", "sample_token", "prompt_positions", "prefill", "decode_step",
           "DecodeState", "start", "decode", "generate", "generate_reference", "stream", "main"]


# -- sampling ----------------------------------------------------------------

def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """(B, V) -> (B, V) float32 (logits - their max) / temperature, -inf at
    removed tokens (the shift leaves every softmax as it is).

    temperature 0 keeps only the argmax (unscaled). Settings as returned by
    gptcore.generation.check_sampling (top_k / top_p None = off).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        best = jnp.argmax(logits, axis=-1)[..., None]  # (B, 1) first index among ties
        return jnp.where(jnp.arange(logits.shape[-1]) == best, logits, -jnp.inf)
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)  # <= 0: a tiny temperature makes -inf, never inf
    logits = jnp.where(shifted == 0, 0.0, shifted / temperature)  # 0 / 0 cannot happen at the largest logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (B, 1) k-th largest value
        logits = jnp.where(logits < kth, -jnp.inf, logits)  # ties with the k-th stay
    if top_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)  # (B, V)
        sorted_probs = -jnp.sort(-probs, axis=-1)  # (B, V) descending
        cum = jnp.cumsum(sorted_probs, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)  # mass ranked above
        n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # (B, 1) >= 1: up to the token crossing p
        threshold = jnp.take_along_axis(sorted_probs, n_keep - 1, axis=-1)  # (B, 1) last kept probability
        logits = jnp.where(probs < threshold, -jnp.inf, logits)  # ties with the last kept stay
    return logits


def sample_token(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """(B, V) logits -> (B,) int32 next tokens."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, *sampling), axis=-1).astype(jnp.int32)


# -- the model calls ---------------------------------------------------------

def prompt_positions(valid: jax.Array) -> jax.Array:
    """(B, P) bool -> (B, P) int32: the number of valid tokens before each
    token (padding gets a clamped position; it is masked anyway)."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1, 0)


def prefill(params, cfg: ModelConfig, prompts: jax.Array, valid: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Run the prompts (B, P) through the model in one call, filling the cache.
    Returns the logits (B, V) of the token after the last prompt token."""
    out = GPT(cfg).apply({"params": params}, prompts, positions=prompt_positions(valid), valid=valid, cache=cache)
    return out.logits[:, -1], out.cache


def decode_step(params, cfg: ModelConfig, cache: Cache, tokens: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed one token per sequence, tokens (B,) at positions (B,); returns the
    logits (B, V) of the next token and the cache holding the fed tokens."""
    out = GPT(cfg).apply({"params": params}, tokens[:, None], positions=positions[:, None], cache=cache)
    return out.logits[:, -1], out.cache


# -- the decode loop ---------------------------------------------------------

class DecodeState(NamedTuple):
    cache: Cache
    last_token: jax.Array  # (B,) int32 the newest emitted token, not yet in the cache
    position: jax.Array  # (B,) int32 its position
    done: jax.Array  # (B,) bool the sequence has emitted eos
    rng: jax.Array


def _special_ids(eos_id: int | None, pad_id: int | None) -> tuple[jax.Array, jax.Array]:
    """eos and pad as int32 scalars, traced rather than compiled in: eos -1
    (no token has that id) when there is none; pad defaults to eos, else 0."""
    pad = pad_id if pad_id is not None else eos_id if eos_id is not None else 0
    return jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad)


def start(params, cfg: ModelConfig, prompts, valid, rng, eos, *, cache_len: int,
          sampling: Sampling) -> tuple[jax.Array, DecodeState]:
    """Prefill a cache of `cache_len` slots and sample the first new token (B,)."""
    cache = init_cache(cfg, prompts.shape[0], cache_len)
    logits, cache = prefill(params, cfg, prompts, valid, cache)
    rng, key = jax.random.split(rng)
    token = sample_token(logits, key, sampling)  # (B,)
    position = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # (B,) position of the first new token
    return token, DecodeState(cache, token, position, token == eos, rng)


def decode(params, cfg: ModelConfig, state: DecodeState, eos, pad, *, steps: int,
           sampling: Sampling) -> tuple[jax.Array, DecodeState]:
    """Up to `steps` more tokens (B, steps) from the cache, in one lax.while_loop
    that stops when every sequence is done; slots never reached hold pad."""
    out = jnp.full((state.last_token.shape[0], steps), pad, jnp.int32)  # (B, steps)

    def unfinished(carry):
        i, s, _ = carry
        return (i < steps) & ~jnp.all(s.done)

    def step(carry):
        i, s, out = carry
        logits, cache = decode_step(params, cfg, s.cache, s.last_token, s.position)
        rng, key = jax.random.split(s.rng)
        token = jnp.where(s.done, pad, sample_token(logits, key, sampling))  # (B,)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, DecodeState(cache, token, s.position + 1, s.done | (token == eos), rng), out

    _, state, out = jax.lax.while_loop(unfinished, step, (jnp.int32(0), state, out))
    return out, state


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def _generate(params, cfg, prompts, valid, rng, eos, pad, *, max_new_tokens, sampling):
    P = prompts.shape[1]
    first, state = start(params, cfg, prompts, valid, rng, eos, cache_len=P + max_new_tokens - 1, sampling=sampling)
    rest, _ = decode(params, cfg, state, eos, pad, steps=max_new_tokens - 1, sampling=sampling)
    return jnp.concatenate([first[:, None], rest], axis=1)  # (B, N)


def _check_prompts(cfg: ModelConfig, prompts, prompt_valid, max_new_tokens: int):
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2:
        raise GenerationError(f"prompts must be (batch, length), got shape {prompts.shape}")
    valid = np.ones(prompts.shape, bool) if prompt_valid is None else np.asarray(prompt_valid, bool)
    if valid.shape != prompts.shape:
        raise GenerationError(f"prompt_valid shape {valid.shape} != prompts shape {prompts.shape}")
    check_request(prompts.shape[1], max_new_tokens, cfg.context_length)
    if not valid[:, -1].all():
        raise GenerationError("prompts must be left-padded: the last column must be a real token in every row")
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
        raise GenerationError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    return jnp.asarray(prompts), jnp.asarray(valid)


def generate(params, cfg: ModelConfig, prompts, prompt_valid=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int | None = None, rng: jax.Array | None = None) -> jax.Array:
    """(B, P) left-padded int prompts, (B, P) bool valid -> (B, N) int32 new tokens.

    Compiled once per (cfg, shapes, max_new_tokens, sampling settings); the rng
    (default PRNGKey(0)) makes sampling reproducible.
    """
    sampling = check_sampling(temperature, top_k, top_p)
    prompts, valid = _check_prompts(cfg, prompts, prompt_valid, max_new_tokens)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(params, cfg, prompts, valid, rng, *_special_ids(eos_id, pad_id),
                     max_new_tokens=max_new_tokens, sampling=sampling)


# -- the reference: no cache -------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _reference_step(params, cfg, tokens, valid, done, rng, slot, eos, pad, *, sampling):
    """Write the token at `slot` of the (B, P + N) buffer after a full forward
    over all of it; slots not yet generated are padding (masked), so one
    compiled step serves every slot."""
    out = GPT(cfg).apply({"params": params}, tokens, positions=prompt_positions(valid), valid=valid)
    logits = jax.lax.dynamic_index_in_dim(out.logits, slot - 1, axis=1, keepdims=False)  # (B, V)
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad, sample_token(logits, key, sampling))  # (B,)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, slot))
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones_like(done)[:, None], (0, slot))
    return tokens, valid, done | (token == eos), rng


def generate_reference(params, cfg: ModelConfig, prompts, prompt_valid=None, *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       eos_id: int | None = None, pad_id: int | None = None,
                       rng: jax.Array | None = None) -> jax.Array:
    """`generate` without a KV cache: every new token re-runs the full forward
    over the whole context (a Python loop over one jitted step). Same tokens as
    `generate` for the same rng: the tests' and benchmark's baseline."""
    sampling = check_sampling(temperature, top_k, top_p)
    prompts, valid = _check_prompts(cfg, prompts, prompt_valid, max_new_tokens)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    B, P = prompts.shape
    eos, pad = _special_ids(eos_id, pad_id)
    tokens = jnp.concatenate([prompts, jnp.full((B, max_new_tokens), pad, jnp.int32)], axis=1)  # (B, P + N)
    valid = jnp.concatenate([valid, jnp.zeros((B, max_new_tokens), bool)], axis=1)  # (B, P + N)
    done = jnp.zeros((B,), bool)
    for i in range(max_new_tokens):
        tokens, valid, done, rng = _reference_step(params, cfg, tokens, valid, done, rng, jnp.int32(P + i),
                                                   eos, pad, sampling=sampling)
        if eos_id is not None and bool(jnp.all(done)):
            break
    return tokens[:, P:]


# -- streaming with a sliding window -----------------------------------------

_start = jax.jit(start, static_argnames=("cfg", "cache_len", "sampling"))
_decode = jax.jit(decode, static_argnames=("cfg", "steps", "sampling"))


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _refill(params, cfg, tokens, *, cache_len):
    """A fresh cache holding tokens (B, W) at positions 0..W-1."""
    cache = init_cache(cfg, tokens.shape[0], cache_len)
    return prefill(params, cfg, tokens, jnp.ones(tokens.shape, bool), cache)[1]


def stream(params, cfg: ModelConfig, prompt_ids: Sequence[int], *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_id: int | None = None, rng: jax.Array | None = None,
           chunk: int = STREAM_CHUNK) -> Iterator[list[int]]:
    """Generate from one prompt, yielding lists of new token ids as they are
    decoded (the first token alone, then `chunk` at a time), eos last if emitted.

    Any length: the context slides as the module docstring describes. Every
    compiled piece has a fixed shape (cache of context_length slots, segments
    of `chunk` steps), so a long generation compiles three functions once.
    """
    sampling = check_sampling(temperature, top_k, top_p)
    if not prompt_ids:
        raise GenerationError("the prompt needs at least one token")
    C = cfg.context_length
    keep = max(1, C // 2)  # tokens of context kept when the window slides
    chunk = max(1, min(chunk, C - keep + 1))  # the positions fed in a segment, keep-1 .. keep+chunk-2, fit in C
    history = [int(t) for t in prompt_ids][-C:]
    prompts = jnp.asarray([history], jnp.int32)  # (1, P)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos, pad = _special_ids(eos_id, None)
    first, state = _start(params, cfg, prompts, jnp.ones(prompts.shape, bool), rng, eos, cache_len=C,
                          sampling=sampling)
    new = [int(first[0])]
    emitted = 1
    while True:
        yield new
        history += new
        if emitted >= max_new_tokens or (eos_id is not None and new[-1] == eos_id):
            return
        if int(state.position[0]) + chunk > C:  # slide: re-encode the newest `keep` tokens
            window = jnp.asarray([history[-keep:]], jnp.int32)  # (1, keep); its last token is fed next
            cache = _refill(params, cfg, window[:, :-1], cache_len=C) if keep > 1 else init_cache(cfg, 1, C)
            state = state._replace(cache=cache, position=jnp.full((1,), keep - 1, jnp.int32))
        tokens, state = _decode(params, cfg, state, eos, pad, steps=chunk, sampling=sampling)
        new = [int(t) for t in np.asarray(tokens[0])][:max_new_tokens - emitted]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        emitted += len(new)


# -- command line ------------------------------------------------------------

def _load(directory: str):
    from jaxgpt.checkpoint import load_model
    cfg, params, tokenizer_path = load_model(directory)
    return cfg, (params, cfg), tokenizer_path


def _stream(model, prompt_ids, *, max_new_tokens, sampling, eos_id, seed):
    params, cfg = model
    return stream(params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                  top_k=sampling.top_k, top_p=sampling.top_p, eos_id=eos_id, rng=jax.random.PRNGKey(seed))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, "python -m jaxgpt.generate", _load, _stream)


if __name__ == "__main__":
    sys.exit(main())
