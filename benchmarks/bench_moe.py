"""Mixture-of-experts dispatch speed: model.moe_impl = dense | capacity |
ragged, each twin, on one Mixtral-shaped config, side by side in one run.

    python benchmarks/bench_moe.py                 # the README table
    python benchmarks/bench_moe.py --steps 6       # quick look
    python benchmarks/bench_moe.py --d-model 1024 --d-ff 3584 --layers 4 --block 1024 \
        --vocab 32000 --dtype bfloat16            # the GPU table (benchmarks/gpu_check.sh)

The config: mixtral's blocks (8 SwiGLU experts, top-2, GQA, RMSNorm, RoPE)
at d_model 256, d_ff 1024, 2 layers, block 128, batch 8 (1,024 tokens per
step) unless the flags say otherwise, random tokens, dropout off. Every
engine is the twin's real training step (bench_train's engines: jaxgpt on
one XLA device, torch eager on CUDA when present), from
the same weights on the same batches, so the loss curves must agree; the
table gives each one's largest relative loss difference to jax dense, and
for capacity the fraction of (token, choice) assignments dropped in the
first layer at the first step. Timing: --warmup untimed steps per engine,
then --steps timed steps in rounds that alternate the engines; median
ms/step and tokens/s, ratios to the same twin's dense.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import JaxEngine, TorchEngine  # noqa: E402

import jaxgpt.model as jm  # noqa: E402
import jaxgpt.ops as jops  # noqa: E402
import torchgpt.model as tm  # noqa: E402
from gptcore.presets import load_model_config  # noqa: E402
from gptcore.train_config import TrainConfig  # noqa: E402

IMPLS = ("dense", "capacity", "ragged")


def config(args):
    cfg = load_model_config("mixtral").replace(
        vocab_size=args.vocab, context_length=args.block, d_model=args.d_model, n_layers=args.layers,
        d_ff=args.d_ff, capacity_factor=1.25)  # the preset's 8 query / 2 key-value heads
    return cfg, TrainConfig(batch_size=args.batch, lr=1e-3, warmup_steps=2, max_steps=1000, grad_clip=1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (jax: the model's dtype; torch: autocast), float32 master weights")
    parser.add_argument("--no-torch", action="store_true", help="jaxgpt's engines only")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    cfg, tc = config(args)
    torch.manual_seed(tc.seed)
    np_state = tm.state_arrays(tm.GPT(cfg))
    rng = np.random.default_rng(0)
    batches = [tuple(a for a in (lambda t: (t[:, :, :-1], t[:, :, 1:], np.ones(t[:, :, 1:].shape, bool)))(
        rng.integers(0, cfg.vocab_size, (1, tc.batch_size, cfg.context_length + 1)).astype(np.int32)))
        for _ in range(args.warmup + args.steps)]
    engines = []
    bf16 = args.dtype == "bfloat16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for impl in IMPLS:
        c = cfg.replace(moe_impl=impl)
        j = JaxEngine(c, tc, np_state, dtype=jnp.bfloat16 if bf16 else jnp.float32)
        j.name = f"jaxgpt {impl}"
        engines.append(j)
        if not args.no_torch:
            t = TorchEngine(c, tc, np_state, device=device, bf16=bf16)
            t.name = f"torch eager {impl}"
            engines.append(t)
    losses = {e.name: [] for e in engines}
    times = {e.name: [] for e in engines}
    step_of = {e.name: 0 for e in engines}

    def take(engine, timed: bool) -> None:
        s = step_of[engine.name]
        start = time.perf_counter()
        metrics = engine.step(batches[s], s)
        dt = time.perf_counter() - start
        losses[engine.name].append(engine.loss(metrics))
        step_of[engine.name] = s + 1
        if timed:
            times[engine.name].append(dt)

    for e in engines:
        for _ in range(args.warmup):
            take(e, False)
    per_round = max(1, args.steps // args.rounds)
    for r in range(min(args.rounds, args.steps)):
        for e in engines if r % 2 == 0 else engines[::-1]:
            for _ in range(per_round):
                take(e, True)

    params = jm.load_state_arrays(np_state, cfg)
    drop = drop_fraction(cfg, params, batches[0][0][0])
    tokens = tc.batch_size * cfg.context_length
    ref = np.array(losses["jaxgpt dense"])
    print(f"### mixtral-shaped: {sum(np.prod(a.shape) for a in np_state.values()) / 1e6:.2f}M params, "
          f"{cfg.n_experts} experts top-{cfg.top_k}, d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.n_layers} layers, "
          f"batch {tc.batch_size} x block {cfg.context_length} = {tokens} tokens/step, capacity factor "
          f"{cfg.capacity_factor} (first step, first layer: {drop:.1%} of assignments dropped)\n")
    print("| engine | tokens/s | ms/step median | vs the twin's dense | max rel. loss diff vs jaxgpt dense |")
    print("|---|---|---|---|---|")
    for e in engines:
        med = statistics.median(times[e.name])
        dense = statistics.median(times[e.name.rsplit(" ", 1)[0] + " dense"])
        n = min(len(losses[e.name]), len(ref))
        rel = np.max(np.abs(np.array(losses[e.name][:n]) - ref[:n]) / np.abs(ref[:n]))
        print(f"| {e.name} | {tokens / med:,.0f} | {med * 1e3:.1f} | {dense / med:.2f}x | {rel:.1e} |")
    print(f"\n(steps {args.steps}, warmup {args.warmup}, compute {args.dtype}, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, torch {torch.__version__} on {device}, {torch.get_num_threads()} "
          f"torch threads)")


def drop_fraction(cfg, params, tokens) -> float:
    """The fraction of the first layer's (token, choice) assignments past
    capacity for the batch `tokens` (B, T); the layer's MoE input is its
    norm2's output (pre-norm), captured from the model itself."""
    _, state = jm.GPT(cfg).apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates"],
                                 capture_intermediates=lambda module, method: module.name == "norm2")
    x = state["intermediates"]["blocks_0"]["norm2"]["__call__"][0]  # (B, T, C)
    router = params["blocks_0"]["mlp"]["router"]
    weights, idx = jops.route(x @ router["kernel"] + router.get("bias", 0.0), cfg.top_k)  # (B, T, k)
    cap = cfg.expert_capacity(x.shape[1])  # each sequence is a group
    plan = jops.dispatch(idx, weights, cfg.n_experts, cap)
    return float(jnp.mean(plan.slot == cfg.n_experts * cap))


if __name__ == "__main__":
    main()
