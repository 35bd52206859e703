"""Training speed: jaxgpt vs torchgpt on the same config, weights and batches.

    python benchmarks/bench_train.py                          # the README tables (CPU)
    python benchmarks/bench_train.py --configs nanogpt --steps 20 --no-compile   # quick look
    python benchmarks/bench_train.py --gpt2-124m              # GPT-2 124M: compile time, tokens/s, MFU

What runs is the real training step of each twin: `jaxgpt.step.train_step`
on a `jaxgpt.step.create_state` state (jitted, state donated) on one XLA
device, the same step as `python -m jaxgpt.train` runs it by default on a CPU
host ("jaxgpt, N CPU devices": the host split into one device per core by
`jaxgpt.runners.split_cpu`, a data-parallel mesh over them; --cpu-devices 1
leaves it out; "..., reference kernels": the same with jaxgpt.ops' autodiff
path instead of jaxgpt.cpu_kernels, what the CPU kernels buy), and
`torchgpt.step.train_step` on a `torchgpt.optim.make_optimizer` optimizer,
eager and (unless --no-compile) with the model wrapped in `torch.compile`.
All start from the same initial weights (torch's init, copied into jax with
load_state_arrays) and see the same batches (gptcore.training.TrainBatches),
so their losses must agree step by step; the table reports the largest
relative difference over every step taken (warmup included).

Timing: after --warmup steps per engine (the first one compiles), --steps
timed steps are taken in rounds that alternate the engines (jax, torch,
torch.compile, then the next round), so load from other processes hits all
of them alike. Every step is timed to completion (jax: block_until_ready on
the new state; torch: train_step returns Python floats). Reported: median
ms/step and its p10-p90 spread, tokens/s = batch tokens / median, and ratios
to torch eager.

- compile: jax, the first step's wall time minus a median step (trace,
  lower, XLA compile); torch.compile, the same for its first step.
- memory: in a fresh process per engine, the peak RSS (VmHWM) over 3
  training steps minus the RSS just before them, when the model, params and
  optimizer state exist: what training adds (activations, gradients,
  workspace, allocator caches; for jax also XLA's compilation, for
  torch.compile inductor's). For jax also XLA's own figure, the compiled
  step's temp buffers (memory_analysis().temp_size_in_bytes).
- GFLOP/s: model FLOPs per step / median step time with nanoGPT's count,
  flops per token = 6 N + 12 L C T (N: parameters without the position
  table, the tied embedding counted once as the lm head; L layers, C d_model,
  T block size; forward + backward, causal attention not halved).
  "% of ceiling": against the same framework's fp32 matmul rate, measured in
  the same run on a 2048 x 2048 x 2048 product.

Configs (dropout off in all: the twins draw different dropout masks, and
equal loss curves need equal functions):
- nanogpt:   configs/nanogpt_shakespeare_char.toml (block 64, batch 12, 4 layers,
             4 heads, 128 dims; its [train] hyperparameters), tiny Shakespeare chars;
- seed001_mini: configs/seed001_mini.toml (block 128, 4 layers, 128 dims), batch 16;
- gpt2-shaped: GPT-2 small's shapes (d_model 768, 12 heads, vocab 50257) with
  2 layers, block 256, batch 4, random tokens.
- gpt2-b8-plain, gpt2-b8-chunked, gpt2-b8-chunked256: the same at batch 8
  with train.loss_chunk 0 (the (B, T, V) logits materialised), 1024 (the
  default) and 256 (the chunked loss); not in the default list.
- mixtral-shaped: benchmarks/bench_moe.py's table (8 experts top-2, d_model
  256): each model.moe_impl (dense, capacity, ragged) in each twin, side by
  side in one run (not in the default list: `--configs mixtral-shaped`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not another install

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxgpt.model as jm
import jaxgpt.runners as jr
import jaxgpt.step as jt
import torchgpt.model as tm
import torchgpt.optim as topt
import torchgpt.step as tt
from gptcore import training
from gptcore.presets import load_config, load_model_config
from gptcore.train_config import DataConfig, TrainConfig
from jaxgpt.runners import MeshRunner

MOE_CONFIG = "mixtral-shaped"  # bench_moe.py's config and table
NO_DROPOUT = dict(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def bench_configs():
    """name -> (ModelConfig, TrainConfig, default steps, default warmup)."""
    nano = load_config("nanogpt_shakespeare_char", [])
    train = nano["train"].replace(max_steps=10_000)
    return {
        "nanogpt": (nano["model"].replace(vocab_size=65, **NO_DROPOUT), train, 60, 5),
        "seed001_mini": (load_model_config("seed001_mini").replace(**NO_DROPOUT), train.replace(batch_size=16),
                         40, 5),
        "gpt2-shaped": (load_model_config("gpt2").replace(n_layers=2, context_length=256, **NO_DROPOUT),
                        train.replace(batch_size=4), 12, 3),
        # the chunked loss's measurement: the gpt2 preset's shapes, batch 8 x 256, without and with it
        "gpt2-b8-plain": (load_model_config("gpt2").replace(n_layers=2, context_length=256, **NO_DROPOUT),
                          train.replace(batch_size=8, loss_chunk=0), 8, 2),
        "gpt2-b8-chunked": (load_model_config("gpt2").replace(n_layers=2, context_length=256, **NO_DROPOUT),
                            train.replace(batch_size=8, loss_chunk=1024), 8, 2),
        "gpt2-b8-chunked256": (load_model_config("gpt2").replace(n_layers=2, context_length=256, **NO_DROPOUT),
                               train.replace(batch_size=8, loss_chunk=256), 8, 2),
    }


# -- measurements -------------------------------------------------------------------
def model_flops_per_token(cfg, n_params: int) -> float:
    """nanoGPT's estimate: 6 N + 12 L C T (see the module docstring)."""
    n = n_params - (cfg.context_length * cfg.d_model if cfg.position == "learned" else 0)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model  # the embedding lookup costs nothing; the untied head is counted
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * cfg.context_length


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> dict:
    """fp32 GFLOP/s of an n x n x n matmul, median of `repeats`, jax and torch."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    mm = jax.jit(lambda x: x @ x)
    mm(ja).block_until_ready()
    ta = torch.from_numpy(a)
    out = {}
    for name, fn in (("jax", lambda: mm(ja).block_until_ready()), ("torch", lambda: ta @ ta)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    return out


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(name: str, engine: str) -> None:
    """(In a child process.) Print the peak RSS growth of 3 training steps, bytes."""
    cfg, tc, _, _ = bench_configs()[name]
    torch.manual_seed(tc.seed)
    np_state = tm.state_arrays(tm.GPT(cfg))
    batch_of = make_batches(cfg, tc)
    if engine.startswith("torch"):
        e = TorchEngine(cfg, tc, np_state, compile_=engine == "torch.compile")
    else:
        kernels = "reference" if engine.endswith(REFERENCE_SUFFIX) else "auto"
        runner = data_parallel_runner(cfg, tc) if engine.startswith("jaxgpt,") else None  # "jaxgpt, N CPU devices"
        e = JaxEngine(cfg, tc, np_state, runner, kernels=kernels)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kb("VmRSS")
    for step in range(3):
        e.step(batch_of(step), step)
    print((status_kb("VmHWM") - base) * 1024)


def measure_memory(name: str, engine: str) -> str:
    out = subprocess.run([sys.executable, __file__, "--memory-probe", name, engine, "--torch-threads",
                          str(torch.get_num_threads()), "--cpu-devices", str(jax.device_count())],
                         capture_output=True, text=True)
    try:
        return f"{int(out.stdout.split()[-1]) / 2**20:.0f}"
    except (ValueError, IndexError):
        return "n/a"


# -- the engines --------------------------------------------------------------------
REFERENCE_SUFFIX = ", reference kernels"


class JaxEngine:
    """jaxgpt's training step through a runner: jr.SingleDevice (one XLA
    device) or what `python -m jaxgpt.train` runs by default (parallel
    "auto": data parallel over the CPU devices split_cpu made)."""

    def __init__(self, cfg, tc, np_state, runner=None, **model_kwargs):
        self.runner = runner or jr.SingleDevice()
        n = self.runner.n_devices
        self.name = "jaxgpt" if n == 1 else f"jaxgpt, {n} CPU devices"
        if model_kwargs.get("kernels") == "reference":
            self.name += REFERENCE_SUFFIX
        self.model = jm.GPT(cfg, **model_kwargs)
        params = jm.load_state_arrays(np_state, cfg)
        if model_kwargs.get("scan_layers"):
            params = jm.stack_layers(params, cfg.n_layers)
        self.state = self.runner.place_state(jt.create_state(self.model, params, tc))
        self.seed = tc.seed

    def step(self, batch, step):
        self.state, metrics = self.runner.step(self.state, self.runner.place_batch(batch),
                                               jt.step_key(self.seed, step))
        jax.block_until_ready(self.state)
        return metrics

    def loss(self, metrics):
        return self.runner.metrics(metrics)["loss"]

    def temp_bytes(self, batch):
        step = getattr(self.runner, "_step", None) or jt.train_step
        compiled = step.lower(self.state, self.runner.place_batch(batch), jt.step_key(self.seed, 0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes


class TorchEngine:
    """torchgpt's training step; on `device`, under bf16 autocast when `bf16`."""

    def __init__(self, cfg, tc, np_state, compile_=False, device="cpu", bf16=False):
        self.name = "torch.compile" if compile_ else "torch eager"
        self.device, self.bf16 = torch.device(device), bf16
        self.model = tm.load_state_arrays(np_state, cfg).to(self.device)
        self.optimizer = topt.make_optimizer(self.model, tc)
        self.module = torch.compile(self.model) if compile_ else self.model
        self.tc = tc

    def step(self, batch, step):
        batch = tuple(torch.from_numpy(a).to(self.device) for a in batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return tt.train_step(self.module, self.optimizer, batch, step, self.tc)

    def loss(self, metrics):
        return metrics["loss"]


def data_parallel_runner(cfg, tc):
    """What python -m jaxgpt.train runs by default on this host (parallel
    "auto"): a data-parallel mesh over as many of the CPU devices as divide
    the batch; None when that is one device."""
    n = jr.cpu_device_count(tc, cores=jax.device_count())
    return MeshRunner(cfg, devices=jax.devices()[:n]) if n > 1 else None


def make_batches(cfg, tc):
    """The step -> (x, y, valid) function both twins train on."""
    if cfg.vocab_size == 65 and CORPUS.is_file():  # the char configs: tiny Shakespeare's characters
        text = CORPUS.read_text(encoding="utf-8")
        chars = sorted(set(text))
        tokens = np.array([chars.index(ch) for ch in text[:200_000]], np.uint16)
    else:
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 500_000).astype(np.uint32)
    return training.TrainBatches(tokens, cfg.context_length, tc, DataConfig()).batch


def run_config(name, cfg, tc, steps, warmup, rounds, use_compile, ceiling) -> str:
    torch.manual_seed(tc.seed)
    np_state = tm.state_arrays(tm.GPT(cfg))
    batch_of = make_batches(cfg, tc)
    engines = [JaxEngine(cfg, tc, np_state), TorchEngine(cfg, tc, np_state)]
    if (runner := data_parallel_runner(cfg, tc)) is not None:
        engines.insert(1, JaxEngine(cfg, tc, np_state, runner))
        # the autodiff reference path on the same devices: what jaxgpt.cpu_kernels buys
        engines.insert(2, JaxEngine(cfg, tc, np_state, data_parallel_runner(cfg, tc), kernels="reference"))
    if use_compile:
        engines.append(TorchEngine(cfg, tc, np_state, compile_=True))
    losses = {e.name: [] for e in engines}
    times = {e.name: [] for e in engines}
    first = {}
    failed = {}
    next_step = {e.name: 0 for e in engines}

    def take(engine, timed):
        s = next_step[engine.name]
        batch = batch_of(s)
        t = time.perf_counter()
        metrics = engine.step(batch, s)
        dt = time.perf_counter() - t
        losses[engine.name].append(engine.loss(metrics))
        next_step[engine.name] = s + 1
        if timed:
            times[engine.name].append(dt)
        return dt

    for e in list(engines):
        try:
            first[e.name] = take(e, False)
            for _ in range(warmup - 1):
                take(e, False)
        except Exception as err:  # torch.compile without a working toolchain, say
            failed[e.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
            engines.remove(e)
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for e in engines if r % 2 == 0 else engines[::-1]:
            for _ in range(per_round):
                take(e, True)

    memory = {e.name: measure_memory(name, e.name) for e in engines}
    jax_temp = {e.name: e.temp_bytes(batch_of(0)) for e in engines if isinstance(e, JaxEngine)}

    n_params = sum(p.numel() for p in next(e for e in engines if e.name == "torch eager").model.parameters())
    tokens = tc.batch_size * tc.grad_accum * cfg.context_length
    flops = model_flops_per_token(cfg, n_params) * tokens
    ref = statistics.median(times["torch eager"])
    ref_losses = np.array(losses["torch eager"])
    lines = [f"### {name}: {n_params / 1e6:.2f}M params, batch {tc.batch_size} x block {cfg.context_length} "
             f"= {tokens} tokens/step, {flops / 1e9:.2f} GFLOP/step", "",
             "| engine | tokens/s | ms/step median (p10-p90) | speed vs torch eager | compile s | training RSS "
             "growth MB | GFLOP/s (% of own matmul ceiling) | loss after step N | max rel. loss diff vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in engines:
        ts = times[e.name]
        med = statistics.median(ts)
        p10, p90 = np.percentile(ts, 10) * 1e3, np.percentile(ts, 90) * 1e3
        own = ceiling["jax" if e.name.startswith("jaxgpt") else "torch"]
        mem = memory[e.name]
        if e.name in jax_temp:
            mem += f" (XLA temp {jax_temp[e.name] / 2**20:.0f})"
        n = min(len(losses[e.name]), len(ref_losses))
        rel = np.max(np.abs(np.array(losses[e.name][:n]) - ref_losses[:n]) / np.abs(ref_losses[:n]))
        lines.append(f"| {e.name} | {tokens / med:,.0f} | {med * 1e3:.1f} ({p10:.1f}-{p90:.1f}) | "
                     f"{ref / med:.2f}x | {max(first[e.name] - med, 0):.1f} | {mem} | "
                     f"{flops / med / 1e9:.1f} ({100 * flops / med / 1e9 / own:.0f}%) | "
                     f"{losses[e.name][-1]:.4f} | {rel:.1e} |")
    for e_name, why in failed.items():
        lines.append(f"| {e_name} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a ({why}) |")
    lines.append("")
    lines.append(f"N = {len(ref_losses)} steps per engine ({warmup} warmup + {len(ref_losses) - warmup} timed, "
                 f"interleaved in {rounds} rounds).")
    return "\n".join(lines)


# -- GPT-2 124M ---------------------------------------------------------------------
def gpt2_124m(args) -> str:
    """Compile time of the full 12-layer GPT-2 small train step (scan vs
    unrolled layers) and its steady tokens/s and MFU on this backend."""
    cfg = load_model_config("gpt2").replace(**NO_DROPOUT)
    tc = TrainConfig(batch_size=args.gpt2_batch, max_steps=10_000,
                     **({} if args.loss_chunk is None else {"loss_chunk": args.loss_chunk}))
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    params = jm.init_params(cfg, 0)
    n_params = jm.count_params(params)
    T = cfg.context_length
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (1, tc.batch_size, T + 1)).astype(np.int32)
    batch = (jnp.asarray(x[..., :-1]), jnp.asarray(x[..., 1:]), jnp.ones((1, tc.batch_size, T), bool))
    lines = [f"### GPT-2 124M ({n_params / 1e6:.1f}M params, block {T}, batch {tc.batch_size}, "
             f"compute {args.dtype}, attention {args.attention}, train.loss_chunk {tc.loss_chunk}) on "
             f"{jax.devices()[0].device_kind}", "",
             "| engine | first-step compile s (trace + lower + compile) | XLA temp GiB | ms/step | tokens/s | MFU |",
             "|---|---|---|---|---|---|"]
    peak = matmul_peak(dtype)
    flops = model_flops_per_token(cfg, n_params) * tc.batch_size * T
    for scan in (True, False) if not args.gpt2_scan_only else (True,):
        model = jm.GPT(cfg, dtype=dtype, scan_layers=scan, attention_impl=args.attention)
        fresh = jax.tree.map(jnp.copy, params)  # the step donates its state: each engine gets its own arrays
        state = jt.create_state(model, jm.stack_layers(fresh, cfg.n_layers) if scan else fresh, tc)
        key = jt.step_key(0, 0)
        t = time.perf_counter()
        compiled = jt.train_step.lower(state, batch, key).compile()
        compile_s = time.perf_counter() - t
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
        row = f"| jaxgpt, {'scan' if scan else 'unrolled'} layers | {compile_s:.1f} | {temp:.2f} |"
        if args.gpt2_steps > 0:
            state, m = compiled(state, batch, key)
            jax.block_until_ready(state)
            ts = []
            for i in range(args.gpt2_steps):
                t = time.perf_counter()
                state, m = compiled(state, batch, jt.step_key(0, i))
                jax.block_until_ready(state)
                ts.append(time.perf_counter() - t)
            med = statistics.median(ts)
            row += f" {med * 1e3:.0f} | {tc.batch_size * T / med:,.0f} | {100 * flops / med / peak:.1f}% |"
        else:
            row += " - | - | - |"
        lines.append(row)
        del state
    if args.torch and args.gpt2_steps > 0:
        for compile_ in (False, True):
            lines.append(torch_124m_row(cfg, tc, batch, args, compile_, flops, peak))
    lines += ["", f"MFU = {flops / 1e9:.0f} GFLOP/step (6N + 12LCT per token) / step time / peak, peak = "
                  f"{peak / 1e12:.1f} TFLOP/s ({PEAK_SOURCE[0]}; measured {PEAK_SOURCE[1]})."]
    return "\n".join(lines)


def torch_124m_row(cfg, tc, batch, args, compile_, flops, peak) -> str:
    """torchgpt's train step on the same batch, on CUDA when present, under
    bf16 autocast when --dtype bfloat16 (float32 master weights, as jaxgpt's
    bf16 compute); its attention is the readable einsum path, as jaxgpt's."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tm.GPT(cfg).to(device)
    optimizer = topt.make_optimizer(model, tc)
    module = torch.compile(model) if compile_ else model
    b = tuple(torch.from_numpy(np.array(a)).to(device) for a in batch)
    bf16 = args.dtype == "bfloat16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        t = time.perf_counter()
        tt.train_step(module, optimizer, b, 0, tc)  # returns Python floats: the step has finished
        first = time.perf_counter() - t
        ts = []
        for i in range(args.gpt2_steps):
            t = time.perf_counter()
            tt.train_step(module, optimizer, b, i + 1, tc)
            ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    name = f"torch{'.compile' if compile_ else ' eager'}{' (bf16 autocast)' if bf16 else ''}, {device.type}"
    tokens_per_s = tc.batch_size * cfg.context_length / med
    mfu = 100 * flops / med / peak
    return f"| {name} | {max(first - med, 0):.1f} | - | {med * 1e3:.0f} | {tokens_per_s:,.0f} | {mfu:.1f}% |"


PEAK_SOURCE = ["measured", "n/a"]
NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                "TPU v5 lite": 197e12, "TPU v5p": 459e12}  # dense bf16 FLOP/s


def matmul_peak(dtype) -> float:
    """The device's nominal dense bf16 peak when known, else a measured big matmul."""
    n = 8192 if jax.default_backend() != "cpu" else 2048
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # random data: zeros run faster on some GPUs
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t)
    measured = 2 * n ** 3 / statistics.median(times)
    PEAK_SOURCE[1] = f"{jnp.dtype(dtype).name} {n}^3 jax matmul on random data: {measured / 1e12:.1f} TFLOP/s"
    kind = jax.devices()[0].device_kind
    for name, peak in NOMINAL_PEAK.items():
        if name in kind:
            PEAK_SOURCE[0] = f"nominal dense bf16 of {kind}"
            return peak
    PEAK_SOURCE[0] = "the measured matmul"
    return measured


def device_info() -> str:
    load = os.getloadavg()
    return (f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); jax {jax.__version__} "
            f"({jax.default_backend()}: {jax.devices()[0].device_kind}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def main(argv=None) -> int:
    configs = bench_configs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="nanogpt,seed001_mini,gpt2-shaped",
                        help="comma-separated, from: " + ", ".join([*configs, MOE_CONFIG]))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per engine (default: per config)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: per config)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device-info", action="store_true", help="print host, versions and load")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gpt2-124m", action="store_true", help="GPT-2 124M: compile time, tokens/s, MFU")
    parser.add_argument("--gpt2-batch", type=int, default=1)
    parser.add_argument("--gpt2-steps", type=int, default=2, help="timed 124M steps (0: compile only)")
    parser.add_argument("--gpt2-scan-only", action="store_true", help="skip the unrolled 124M compile")
    parser.add_argument("--torch", action="store_true", help="124M: also torchgpt eager and torch.compile rows")
    parser.add_argument("--loss-chunk", type=int, default=None, help="124M: train.loss_chunk (default: its default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="124M compute dtype (default: bfloat16 on an accelerator, float32 on CPU)")
    parser.add_argument("--attention", choices=("einsum", "xla", "cudnn"), default="einsum",
                        help="124M attention: ours, jax.nn.dot_product_attention xla, or cuDNN flash")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="XLA CPU devices for the data-parallel jaxgpt engine, as train.cpu_devices "
                             "(default 0: one per core; 1: single device only)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CONFIG", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.gpt2_124m:  # before JAX starts, as python -m jaxgpt.train does
        jr.split_cpu(bench_configs()["nanogpt"][1].replace(cpu_devices=args.cpu_devices))
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return 0
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in configs and n != MOE_CONFIG]
    if unknown:
        print(f"error: unknown config {unknown[0]!r} (choose from {', '.join([*configs, MOE_CONFIG])})",
              file=sys.stderr)
        return 2
    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if args.device_info:
        print(device_info() + "\n")
    if args.gpt2_124m:
        print(gpt2_124m(args) + "\n")
        return 0
    ceiling = matmul_ceiling()
    print(f"fp32 2048^3 matmul ceiling: jax {ceiling['jax']:.0f} GFLOP/s, torch {ceiling['torch']:.0f} GFLOP/s\n")
    for name in names:
        if name == MOE_CONFIG:
            import bench_moe  # its engines are this file's
            bench_moe.main([f"--steps={args.steps or 12}", f"--warmup={args.warmup or 2}"])
            continue
        cfg, tc, steps, warmup = configs[name]
        print(run_config(name, cfg, tc, args.steps or steps, args.warmup or warmup, args.rounds,
                         not args.no_compile, ceiling) + "\n", flush=True)
    if args.device_info:
        print(device_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
