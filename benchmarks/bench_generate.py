"""Generation speed: KV-cached decoding vs re-running the full forward.

    python benchmarks/bench_generate.py                      # the README table
    python benchmarks/bench_generate.py --new-tokens 64 --batches 1   # quick look

For each model and batch size: tokens/s of 512 new tokens (eos off, so every
token is generated) after a 16-token prompt, for

- jaxgpt cached:   jaxgpt.generate.generate (prefill + one compiled while_loop);
- jaxgpt no-cache: jaxgpt.generate.generate_reference (a Python loop over one
                   jitted step that re-runs the full forward over the fixed
                   (B, prompt + new) buffer, not-yet-generated slots masked);
- torchgpt cached: torchgpt.generate.generate (eager, KV cache), timed with
                   1 thread and with all threads, the faster one reported
                   (one-token steps are dominated by thread wake-ups).

Compile time is excluded from tokens/s and reported separately (an
ahead-of-time `.lower(...).compile()` of the same function, timed; every
timed run follows a warm-up call). Greedy decoding; random weights (speed does not depend on them).

Models: seed001_mini with context_length raised from 128 to 1024 (positions
are learned, so 16 + 512 tokens need a longer table; nothing else changes),
and GPT-2 small's shape cut to 4 layers (d_model 768, 12 heads, vocab 50257).
The no-cache loop on the GPT-2-shaped model runs fewer new tokens (its full
forward costs ~seconds per token on a CPU); the table says how many.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxgpt.generate as jg
import jaxgpt.model as jm
import torchgpt.generate as tg
import torchgpt.model as tm
from gptcore.generation import check_sampling
from gptcore.presets import load_model_config

THREADS = torch.get_num_threads()
NO_DROPOUT = dict(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
MODELS = {
    "seed001_mini (ctx 1024)": load_model_config("seed001_mini").replace(context_length=1024, **NO_DROPOUT),
    "gpt2-shaped, 4 layers": load_model_config("gpt2").replace(n_layers=4, **NO_DROPOUT),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def bench(name, cfg, batch, prompt_len, new_tokens, no_cache_tokens, rows):
    params = jm.init_params(cfg, seed=0)
    tmodel = tm.load_state_arrays(jm.state_arrays(params), cfg)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    kw = dict(temperature=0.0)

    sampling = check_sampling(**kw)
    eos, pad = jnp.int32(-1), jnp.int32(0)  # no eos: every token is generated
    key = jax.random.PRNGKey(0)

    # jaxgpt cached: compile ahead of time (timed), warm up, then time a call
    args = (params, cfg, jnp.asarray(prompts), jnp.ones(prompts.shape, bool), key, eos, pad)
    _, compile_s = timed(lambda: jg._generate.lower(*args, max_new_tokens=new_tokens, sampling=sampling).compile())
    run = lambda: jg.generate(params, cfg, prompts, max_new_tokens=new_tokens, **kw)
    timed(run)
    cached, t = timed(run)
    rows.append((name, batch, "jaxgpt cached", new_tokens, batch * new_tokens / t, compile_s))

    # jaxgpt no-cache loop: compile its one step ahead of time (timed), warm up, then time the loop
    n = min(new_tokens, no_cache_tokens)
    buf = jnp.zeros((batch, prompt_len + n), jnp.int32)
    args = (params, cfg, buf, buf > 0, jnp.zeros(batch, bool), key, jnp.int32(prompt_len), eos, pad)
    _, compile_s = timed(lambda: jg._reference_step.lower(*args, sampling=sampling).compile())
    timed(lambda: jg._reference_step(*args, sampling=sampling))
    ref, t = timed(lambda: jg.generate_reference(params, cfg, prompts, max_new_tokens=n, **kw))
    rows.append((name, batch, "jaxgpt no-cache", n, batch * n / t, compile_s))
    assert (np.asarray(ref) == np.asarray(cached)[:, :n]).all(), "cached and no-cache greedy tokens differ"

    # torchgpt cached (eager: nothing to compile); the faster of 1 thread and all threads
    best = None
    for threads in sorted({1, THREADS}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            tg.generate(tmodel, prompts, max_new_tokens=4, **kw)  # warm-up allocations
            t0 = time.perf_counter()
            tokens = tg.generate(tmodel, prompts, max_new_tokens=new_tokens, **kw)
            t = time.perf_counter() - t0
        if best is None or t < best[0]:
            best = (t, threads)
    torch.set_num_threads(THREADS)
    rows.append((name, batch, f"torchgpt cached ({best[1]} thr)", new_tokens, batch * new_tokens / best[0], 0.0))
    agree = (tokens.numpy() == np.asarray(cached)).mean()
    print(f"# {name} B={batch}: jax/torch greedy token agreement {agree:.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-cache-tokens-large", type=int, default=32,
                   help="new tokens of the no-cache loop on the GPT-2-shaped model")
    args = p.parse_args()
    print(f"# jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for name in args.models:
        cfg = MODELS[name]
        no_cache = args.new_tokens if name.startswith("seed001") else args.no_cache_tokens_large
        for batch in args.batches:
            bench(name, cfg, batch, args.prompt_len, args.new_tokens, no_cache, rows)
            print(f"# done {name} B={batch}", flush=True)

    print("\n| model | batch | generator | new tokens | tokens/s | compile (s) |")
    print("|---|---:|---|---:|---:|---:|")
    for name, batch, gen, n, tps, comp in rows:
        print(f"| {name} | {batch} | {gen} | {n} | {tps:,.0f} | {comp:.1f} |")
    print("\n| model | batch | jaxgpt cached / no-cache (tokens/s) | jaxgpt cached / torchgpt cached |")
    print("|---|---:|---:|---:|")
    for i in range(0, len(rows), 3):
        (name, batch, _, _, cached, _), (_, _, _, n, ref, _), (_, _, _, _, torch_tps, _) = rows[i:i + 3]
        print(f"| {name} | {batch} | {cached / ref:.1f}x" + (f" (no-cache at {n} tokens)" if n != args.new_tokens
                                                             else "") + f" | {cached / torch_tps:.1f}x |")


if __name__ == "__main__":
    main()
