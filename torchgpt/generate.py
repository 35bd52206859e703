"""Autoregressive generation with a KV cache, in PyTorch: the reference twin.

Parallel text: jaxgpt/generate.py (same functions, same order, same rules;
plain Python loops where the jax twin compiles a lax.while_loop).

    tokens = generate(model.eval(), prompts, prompt_valid, max_new_tokens=100,
                      temperature=0.8, top_k=50, top_p=0.95, eos_id=eos,
                      generator=torch.Generator().manual_seed(0))

The whole (left-padded) prompt batch is prefilled in one forward call; each
decode step then feeds only the newest token and reads the rest from the KV
cache, stopping early when every sequence has emitted eos. The position of a
token is the number of valid tokens before it, so a padded prompt sees the
positions and context it would see alone. After a sequence emits `eos_id` it
emits `pad_id` (default: eos_id).

Sampling conventions (`filter_logits`, shared with the jax twin, see
gptcore/generation.py): temperature 0 is greedy (argmax, lowest index among
ties); top-k keeps every token tied with the k-th largest logit; top-p keeps
the smallest set of most probable tokens whose cumulative probability reaches
p, including the token that crosses p and any ties of the last token kept.

The context limit, as in the jax twin: `generate` and `generate_reference`
raise GenerationError when prompt length + max_new_tokens > context_length;
`stream` (the CLI) crops prompts to their last context_length tokens and,
when the next segment would not fit, re-encodes the newest
context_length // 2 tokens from position 0 and continues.

CLI (the model directory of either twin; reads config.json + model.safetensors):

    python -m torchgpt.generate --checkpoint DIR --prompt "ROMEO:" --max-new-tokens 200 \
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0 --num-samples 2

The random streams of the twins differ (torch.Generator vs jax.random), so
sampled text differs between them for the same seed; greedy text is the same.

Shape legend: B batch, P prompt length, N new tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from gptcore.generation import (
    STREAM_CHUNK,
    GenerationError,
    Sampling,
    check_request,
    check_sampling,
    run_cli,
)
from torchgpt.model import GPT, Cache, init_cache

__all__ = ["GenerationError", "filter_logits", "sample_token", "prompt_positions", "prefill", "decode_step",
           "DecodeState", "start", "decode", "generate", "generate_reference", "stream", "main"]


# -- sampling ----------------------------------------------------------------

def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """(B, V) -> (B, V) float32 (logits - their max) / temperature, -inf at
    removed tokens (the shift leaves every softmax as it is).

    temperature 0 keeps only the argmax (unscaled). Settings as returned by
    gptcore.generation.check_sampling (top_k / top_p None = off).
    """
    logits = logits.float()
    if temperature == 0.0:
        best = logits.argmax(dim=-1, keepdim=True)  # (B, 1) first index among ties
        return logits.masked_fill(torch.arange(logits.shape[-1]) != best, -torch.inf)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # <= 0: a tiny temperature makes -inf, never inf
    logits = torch.where(shifted == 0, 0.0, shifted / temperature)  # 0 / 0 cannot happen at the largest logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1) k-th largest value
        logits = logits.masked_fill(logits < kth, -torch.inf)  # ties with the k-th stay
    if top_p is not None:
        probs = logits.softmax(dim=-1)  # (B, V)
        sorted_probs = probs.sort(dim=-1, descending=True).values  # (B, V)
        cum = sorted_probs.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # mass ranked above
        n_keep = (before < top_p).sum(dim=-1, keepdim=True)  # (B, 1) >= 1: up to the token crossing p
        threshold = sorted_probs.gather(-1, n_keep - 1)  # (B, 1) last kept probability
        logits = logits.masked_fill(probs < threshold, -torch.inf)  # ties with the last kept stay
    return logits


def sample_token(logits: torch.Tensor, generator: torch.Generator | None, sampling: Sampling) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 next tokens."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, *sampling).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- the model calls ---------------------------------------------------------

def prompt_positions(valid: torch.Tensor) -> torch.Tensor:
    """(B, P) bool -> (B, P) int64: the number of valid tokens before each
    token (padding gets a clamped position; it is masked anyway)."""
    return (valid.long().cumsum(dim=-1) - 1).clamp(min=0)


def prefill(model: GPT, prompts: torch.Tensor, valid: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
    """Run the prompts (B, P) through the model in one call, filling the cache.
    Returns the logits (B, V) of the token after the last prompt token."""
    out = model(prompts, positions=prompt_positions(valid), valid=valid, cache=cache)
    return out.logits[:, -1], out.cache


def decode_step(model: GPT, cache: Cache, tokens: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """Feed one token per sequence, tokens (B,) at positions (B,); returns the
    logits (B, V) of the next token and the cache holding the fed tokens."""
    out = model(tokens[:, None], positions=positions[:, None], cache=cache)
    return out.logits[:, -1], out.cache


# -- the decode loop ---------------------------------------------------------

class DecodeState(NamedTuple):
    cache: Cache
    last_token: torch.Tensor  # (B,) int64 the newest emitted token, not yet in the cache
    position: torch.Tensor  # (B,) int64 its position
    done: torch.Tensor  # (B,) bool the sequence has emitted eos
    # the random state is the caller's torch.Generator, not part of the state


def _special_ids(eos_id: int | None, pad_id: int | None) -> tuple[int, int]:
    """eos and pad ids: eos -1 (no token has that id) when there is none; pad
    defaults to eos, else 0."""
    pad = pad_id if pad_id is not None else eos_id if eos_id is not None else 0
    return -1 if eos_id is None else eos_id, pad


def start(model: GPT, prompts, valid, generator, eos: int, *, cache_len: int,
          sampling: Sampling) -> tuple[torch.Tensor, DecodeState]:
    """Prefill a cache of `cache_len` slots and sample the first new token (B,)."""
    cache = init_cache(model.cfg, prompts.shape[0], cache_len, device=prompts.device)
    logits, cache = prefill(model, prompts, valid, cache)
    token = sample_token(logits, generator, sampling)  # (B,)
    position = valid.long().sum(dim=-1)  # (B,) position of the first new token
    return token, DecodeState(cache, token, position, token == eos)


def decode(model: GPT, state: DecodeState, generator, eos: int, pad: int, *, steps: int,
           sampling: Sampling) -> tuple[torch.Tensor, DecodeState]:
    """Up to `steps` more tokens (B, steps) from the cache, stopping when every
    sequence is done; slots never reached hold pad."""
    out = torch.full((state.last_token.shape[0], steps), pad, dtype=torch.long)  # (B, steps)
    for i in range(steps):
        if state.done.all():
            break
        logits, cache = decode_step(model, state.cache, state.last_token, state.position)
        token = sample_token(logits, generator, sampling).masked_fill(state.done, pad)  # (B,)
        out[:, i] = token
        state = DecodeState(cache, token, state.position + 1, state.done | (token == eos))
    return out, state


def _check_prompts(model: GPT, prompts, prompt_valid, max_new_tokens: int):
    cfg = model.cfg
    if model.training:
        raise GenerationError("the model is in training mode (dropout on): call model.eval() first")
    prompts = torch.as_tensor(prompts).long()
    if prompts.ndim != 2:
        raise GenerationError(f"prompts must be (batch, length), got shape {tuple(prompts.shape)}")
    valid = torch.ones(prompts.shape, dtype=torch.bool) if prompt_valid is None else torch.as_tensor(prompt_valid).bool()
    if valid.shape != prompts.shape:
        raise GenerationError(f"prompt_valid shape {tuple(valid.shape)} != prompts shape {tuple(prompts.shape)}")
    check_request(prompts.shape[1], max_new_tokens, cfg.context_length)
    if not valid[:, -1].all():
        raise GenerationError("prompts must be left-padded: the last column must be a real token in every row")
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
        raise GenerationError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    return prompts, valid


@torch.no_grad()
def generate(model: GPT, prompts, prompt_valid=None, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P) left-padded int prompts, (B, P) bool valid -> (B, N) int64 new tokens."""
    sampling = check_sampling(temperature, top_k, top_p)
    prompts, valid = _check_prompts(model, prompts, prompt_valid, max_new_tokens)
    P = prompts.shape[1]
    eos, pad = _special_ids(eos_id, pad_id)
    first, state = start(model, prompts, valid, generator, eos, cache_len=P + max_new_tokens - 1, sampling=sampling)
    rest, _ = decode(model, state, generator, eos, pad, steps=max_new_tokens - 1, sampling=sampling)
    return torch.cat([first[:, None], rest], dim=1)  # (B, N)


# -- the reference: no cache -------------------------------------------------

@torch.no_grad()
def generate_reference(model: GPT, prompts, prompt_valid=None, *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       eos_id: int | None = None, pad_id: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """`generate` without a KV cache: every new token re-runs the full forward
    over the whole context so far (nanoGPT's loop). Same tokens as `generate`
    for the same generator state: the tests' baseline."""
    sampling = check_sampling(temperature, top_k, top_p)
    tokens, valid = _check_prompts(model, prompts, prompt_valid, max_new_tokens)
    P = tokens.shape[1]
    eos, pad = _special_ids(eos_id, pad_id)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(tokens, positions=prompt_positions(valid), valid=valid).logits[:, -1]  # (B, V)
        token = sample_token(logits, generator, sampling).masked_fill(done, pad)  # (B,)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(done)[:, None]], dim=1)
        done = done | (token == eos)
        if eos_id is not None and done.all():
            break
    new = tokens[:, P:]
    return torch.cat([new, torch.full((new.shape[0], max_new_tokens - new.shape[1]), pad)], dim=1)  # (B, N)


# -- streaming with a sliding window -----------------------------------------

@torch.no_grad()
def stream(model: GPT, prompt_ids: Sequence[int], *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_id: int | None = None, generator: torch.Generator | None = None,
           chunk: int = STREAM_CHUNK) -> Iterator[list[int]]:
    """Generate from one prompt, yielding lists of new token ids as they are
    decoded (the first token alone, then `chunk` at a time), eos last if emitted.

    Any length: the context slides as the module docstring describes; the
    segments match the jax twin's, so greedy output is the same.
    """
    sampling = check_sampling(temperature, top_k, top_p)
    if not prompt_ids:
        raise GenerationError("the prompt needs at least one token")
    cfg = model.cfg
    C = cfg.context_length
    keep = max(1, C // 2)  # tokens of context kept when the window slides
    chunk = max(1, min(chunk, C - keep + 1))  # the positions fed in a segment, keep-1 .. keep+chunk-2, fit in C
    history = [int(t) for t in prompt_ids][-C:]
    prompts = torch.tensor([history])  # (1, P)
    eos, pad = _special_ids(eos_id, None)
    first, state = start(model, prompts, torch.ones(prompts.shape, dtype=torch.bool), generator, eos, cache_len=C,
                         sampling=sampling)
    new = [int(first[0])]
    emitted = 1
    while True:
        yield new
        history += new
        if emitted >= max_new_tokens or (eos_id is not None and new[-1] == eos_id):
            return
        if int(state.position[0]) + chunk > C:  # slide: re-encode the newest `keep` tokens
            window = torch.tensor([history[-keep:]])  # (1, keep); its last token is fed next
            cache = init_cache(cfg, 1, C)
            if keep > 1:
                _, cache = prefill(model, window[:, :-1], torch.ones((1, keep - 1), dtype=torch.bool), cache)
            state = state._replace(cache=cache, position=torch.full((1,), keep - 1))
        # only the tokens still wanted are decoded (the jax twin runs fixed-shape segments and drops the rest)
        tokens, state = decode(model, state, generator, eos, pad, steps=min(chunk, max_new_tokens - emitted),
                               sampling=sampling)
        new = tokens[0].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        emitted += len(new)


# -- command line ------------------------------------------------------------

SMALL_MODEL = 20_000_000  # parameters: below this, one token's step is too short to share between threads


def _load(directory: str):
    from torchgpt.checkpoint import load_model
    cfg, model, tokenizer_path = load_model(directory)
    set_threads(model)
    return cfg, model, tokenizer_path


def set_threads(model: GPT) -> None:
    """Decoding a small model one token at a time runs faster on one
    thread than on several (measured: 0.8M parameters, 557 against 303
    tokens/s with 2 threads on a loaded 2-core machine); OMP_NUM_THREADS, when set, wins."""
    if "OMP_NUM_THREADS" not in os.environ and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


def _stream(model, prompt_ids, *, max_new_tokens, sampling, eos_id, seed):
    return stream(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                  top_k=sampling.top_k, top_p=sampling.top_p, eos_id=eos_id,
                  generator=torch.Generator().manual_seed(seed))


def main(argv: Sequence[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return run_cli(argv, "python -m torchgpt.generate", _load, _stream)
    finally:
        torch.set_num_threads(threads)  # set_threads's choice ends with the command (main runs in-process too)


if __name__ == "__main__":
    sys.exit(main())
