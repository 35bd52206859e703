"""Parallel training equals single-device training over 20 steps with
gradient accumulation and clipping: every (data, fsdp, tensor) mesh shape
the scale-out work names and pmap on 8 simulated devices, for a dense and a
GQA model, and two processes on 127.0.0.1 (gloo) with fsdp and tensor
axes. Each case runs in a subprocess because the device count is fixed when
jax starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SHAKESPEARE

# Each run named in argv[1] (comma-separated "MODEL/KIND": KIND is single, pmap or FSDP.TENSOR, a
# mesh) trains 20 steps and writes argv[2]/MODEL-KIND.npz on process 0: per-step loss and grad
# norm, the val loss of two batches after them (runner.evaluate), the final params, the state's bytes
# in all and on the first device.
SCRIPT = r"""
import sys, jax, numpy as np
runs, out = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:  # multi-process: coordinator, num_processes, process_id
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig
import jaxgpt.step as js
from jaxgpt import runners
models = {  # dense: MHA, tied embeddings; gqa: 2 KV heads for 8 query heads, untied, scanned layers, a vocabulary
    # large enough for the chunked loss (in slices of 8 tokens: chunked on every device of every mesh)
    "dense": (ModelConfig(vocab_size=64, context_length=16, d_model=64, n_layers=2, n_heads=8, d_ff=128,
                          qkv_fused=False), False),
    "gqa": (ModelConfig(vocab_size=8192, context_length=16, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
                        d_ff=96, position="rope", mlp="swiglu", norm="rmsnorm", qkv_fused=False,
                        tie_embeddings=False), True),
    # moe: 4 SwiGLU experts top-2 and a shared expert, capacity dispatch with room for every token
    "moe": (ModelConfig(vocab_size=64, context_length=16, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
                        d_ff=64, position="rope", mlp="swiglu", norm="rmsnorm", qkv_fused=False, n_experts=4,
                        top_k=2, shared_expert=True, aux_loss_coef=0.01, moe_impl="capacity",
                        capacity_factor=2.0), False)}
for run in runs.split(","):
    name, kind = run.split("/")
    mc, scan = models[name]
    tc = TrainConfig(batch_size=8, grad_accum=2, warmup_steps=2, max_steps=20, lr=1e-3, grad_clip=0.5, adam_eps=1e-6,
                     scan_layers=scan, loss_chunk=8)
    if kind in ("single", "pmap"):
        runner = runners.SingleDevice() if kind == "single" else runners.PmapRunner()
    else:
        fsdp, tensor, expert = map(int, (kind.split(".") + ["1"])[:3])
        runner = runners.MeshRunner(mc, fsdp, tensor, expert=expert)
    state = runner.init_state(lambda: js.fresh_state(js.make_model(mc, tc), mc, tc))
    leaves = jax.tree_util.tree_leaves(state)
    total = sum(a.nbytes for a in leaves)
    first = sum(a.addressable_shards[0].data.nbytes if isinstance(a, jax.Array) else a.nbytes for a in leaves)
    experts = state.params["blocks_0"]["mlp"].get("experts", {}).get("up", {}).get("kernel") if mc.is_moe else None
    expert_share = experts.addressable_shards[0].data.nbytes / experts.nbytes if experts is not None else 1.0
    losses, norms = [], []
    for step in range(20):
        # learnable sequences (random targets leave Adam amplifying float32 noise): counting by 1..3
        rng = np.random.default_rng(step)
        start, stride = rng.integers(0, 64, (2, 8, 1)), rng.integers(1, 4, (2, 8, 1))
        seq = ((start + stride * np.arange(17)) % 64).astype(np.int32)
        x, y = seq[..., :-1], seq[..., 1:]
        rows = runner.local_rows(8)  # a process feeds only its rows of the batch, as the loop does
        x, y = (x, y) if rows is None else (x[:, rows], y[:, rows])
        state, m = runner.step(state, runner.place_batch((x, y, np.ones(x.shape, bool))), js.step_key(0, step))
        metrics = runner.metrics(m)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    evals = [tuple(np.random.default_rng(100 + i).integers(0, 64, (2, 8, 16)).astype(np.int32)) for i in range(2)]
    val = runner.evaluate(state, evals)  # every process passes the whole evaluation batch
    if kind == "single":  # the chunked evaluation (gqa's vocabulary) is the plain one's
        plain = js.evaluate(lambda x, y: js.eval_loss(state.params, state.model, x, y, 0), evals)
        assert abs(plain - val) <= 1e-6 * plain, (plain, val)
    params = runners.gather(runner.checkpoint_state(state).params)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(f"{out}/{name}-{kind}.npz", loss=losses, grad_norm=norms, val=val, total_bytes=total,
                 first_bytes=first, expert_share=expert_share, **flat)
"""
def run(args: list[str], devices: int) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def load(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same(got: dict, want: dict, what: str, rtol: float = 1e-5) -> None:
    """Losses and grad norms of every step and every final param, to rtol
    (float32 reassociation: each mesh sums in its own order; measured ~2e-7).
    The runs use adam_eps 1e-6: with 1e-8, Adam moves a param whose gradient
    is rounding noise around zero by a full lr step of the noise's sign, and
    such flips grew the meshes' differences to ~1e-5 in 20 steps."""
    params = sorted(k for k in want if k.startswith("["))
    assert params and params == sorted(k for k in got if k.startswith("["))
    for k in ("loss", "grad_norm", "val"):
        # clipping and Adam hide a gradient summed twice from the params: the norm does not
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=0, err_msg=f"{what}: {k}")
    for k in params:
        assert np.linalg.norm(got[k] - want[k]) <= rtol * np.linalg.norm(want[k]), (what, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One device's runs of both models."""
    path = tmp_path_factory.mktemp("ref")
    finish(run(["dense/single,gqa/single,moe/single", str(path)], 1))
    return path


# FSDP.TENSOR on 8 devices: data 8 (shard_map); fsdp 8; fsdp 4 x tensor 2; data 2 x tensor 4;
# data 2 x fsdp 2 x tensor 2; and pmap over the 8
MESHES_8 = ("1.1", "8.1", "4.2", "1.4", "2.2", "pmap")


@pytest.mark.parametrize("model", ["dense", "gqa"])
def test_every_mesh_on_8_devices_equals_single_device(model, reference, tmp_path):
    """Each mesh shape trains the single device's run, from a state created
    sharded (so the sharded init is the single-device init too). The GQA
    model has 2 KV heads: tensor 4 replicates its KV projections. And the
    state really is split: the first device holds about 1 / (fsdp x tensor)
    of it (norm gains and the other small vectors are replicated)."""
    finish(run([",".join(f"{model}/{k}" for k in MESHES_8), str(tmp_path)], 8))
    want = load(reference / f"{model}-single.npz")
    for kind in MESHES_8:
        got = load(tmp_path / f"{model}-{kind}.npz")
        assert_same(got, want, f"{model} on mesh fsdp.tensor={kind}")
        if kind != "pmap":
            fsdp, tensor = map(int, kind.split("."))
            share = float(got["first_bytes"]) / float(got["total_bytes"])
            assert share < 1.25 / (fsdp * tensor), (kind, share)


def test_layout_follows_the_logical_axis_rules():
    """Megatron-style tensor sharding, FSDP over the embedding dimension,
    optimizer moments laid out like their params, and the fallbacks: a
    dimension the axis does not divide, or KV heads fewer than the tensor
    axis, stay whole."""
    import jax
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from gptcore.config import ModelConfig
    from gptcore.train_config import TrainConfig
    from jaxgpt import step
    from jaxgpt.sharding import MESH_AXES, Layout
    mc = ModelConfig(vocab_size=66, context_length=16, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=96,
                     mlp="swiglu", qkv_fused=False, tie_embeddings=False)
    tc = TrainConfig(scan_layers=True)
    shapes = jax.eval_shape(lambda: step.fresh_state(step.make_model(mc, tc), mc, tc))

    def specs(fsdp, tensor):
        layout = Layout(AbstractMesh((8 // (fsdp * tensor), fsdp, 1, tensor), MESH_AXES), mc)
        return {jax.tree_util.keystr(k): s.spec for k, s in
                jax.tree_util.tree_leaves_with_path(layout.state_shardings(shapes))}

    got = specs(4, 2)
    attn, mlp = "['blocks']['attn']", "['blocks']['mlp']"
    assert got[f".params{attn}['q_proj']['kernel']"] == P(None, "fsdp", "tensor")  # (L, C, H*D): column
    assert got[f".params{attn}['out_proj']['kernel']"] == P(None, "tensor", "fsdp")  # (L, H*D, C): row
    assert got[f".params{attn}['k_proj']['kernel']"] == P(None, "fsdp", "tensor")  # 2 KV heads over tensor 2
    assert got[f".params{mlp}['gate']['kernel']"] == P(None, "fsdp", "tensor")
    assert got[f".params{mlp}['down']['kernel']"] == P(None, "tensor", "fsdp")
    assert got[".params['tok_emb']['embedding']"] == P("tensor", "fsdp")  # (V, C)
    assert got[".params['lm_head']['kernel']"] == P("fsdp", "tensor")  # (C, V)
    assert got[".params['norm_f']['scale']"] == P() and got[".step"] == P()
    moments = {k: v for k, v in got.items() if ".mu" in k or ".nu" in k}
    assert len(moments) == 2 * len([k for k in got if k.startswith(".params")])
    assert all(v == got[".params" + k[k.index("['"):]] for k, v in moments.items())
    got = specs(2, 4)
    assert got[f".params{attn}['k_proj']['kernel']"] == P(None, "fsdp")  # 2 KV heads, tensor 4: replicated
    assert got[f".params{attn}['q_proj']['kernel']"] == P(None, "fsdp", "tensor")
    assert got[f".params{mlp}['up']['kernel']"] == P(None, "fsdp", "tensor")  # 96 over 4
    specs_8 = specs(8, 1)
    assert specs_8[".params['tok_emb']['embedding']"] == P(None, "fsdp")
    assert Layout(AbstractMesh((1, 1, 1, 4), MESH_AXES), mc.replace(vocab_size=66)).spec(("vocab", "embed"),
                                                                                         (66, 64)) == P()


# FSDP.TENSOR.EXPERT on 8 devices: data 2 x expert 4; fsdp 2 x expert 2 x tensor 2
MESHES_EP = ("1.1.4", "2.2.2")


def test_expert_parallelism_equals_single_device(reference, tmp_path):
    """A mixture of experts with its experts split over an expert axis
    trains the single device's run: losses, grad norms (a gradient counted
    twice across the expert axis, the kind of bug reported for EP, changes
    the norm) and params; each device holds 1 / expert of the experts."""
    finish(run([",".join(f"moe/{k}" for k in MESHES_EP), str(tmp_path)], 8))
    want = load(reference / "moe-single.npz")
    for kind in MESHES_EP:
        got = load(tmp_path / f"moe-{kind}.npz")
        assert_same(got, want, f"moe on mesh fsdp.tensor.expert={kind}")
        fsdp, tensor, expert = map(int, kind.split("."))
        assert float(got["expert_share"]) == pytest.approx(1 / (fsdp * tensor * expert)), kind


def test_two_processes_equal_one(reference, tmp_path):
    """Two processes with 2 devices each, gloo collectives, fsdp 2 x tensor 2
    for both models (tensor groups within a process, fsdp across the two)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = "dense/2.2,gqa/2.2"
    procs = [run([runs, str(tmp_path), f"127.0.0.1:{port}", "2", str(pid)], 2) for pid in range(2)]
    for proc in procs:
        finish(proc)
    for one in runs.split(","):
        model, kind = one.split("/")
        assert_same(load(tmp_path / f"{model}-{kind}.npz"), load(reference / f"{model}-single.npz"), one)


def test_cpu_devices_divide_the_batch():
    """train.cpu_devices = 0: one device per core, fewer when the batch needs it."""
    from gptcore.train_config import TrainConfig
    from jaxgpt.runners import cpu_device_count
    assert cpu_device_count(TrainConfig(batch_size=12), cores=2) == 2
    assert cpu_device_count(TrainConfig(batch_size=12), cores=8) == 6
    assert cpu_device_count(TrainConfig(batch_size=7), cores=4) == 1
    assert cpu_device_count(TrainConfig(batch_size=12, cpu_devices=3), cores=2) == 3


def test_cli_default_is_data_parallel_over_cpu_devices(tmp_path):
    """python -m jaxgpt.train splits the CPU into train.cpu_devices devices and
    (parallel = "auto") trains data parallel over them: the same losses as
    one device, to float32 reassociation (without dropout: each device draws
    its own masks, as in pmap and DDP)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = [sys.executable, "-m", "jaxgpt.train", "--config", "debug", f"data.corpus={corpus}",
              "train.max_steps=20", "train.log_interval=1", "train.sample_tokens=0", "train.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"d{n}"
        proc = subprocess.run(common + [f"train.cpu_devices={n}", f"train.out_dir={out}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("devices: 1 CPU device" if n == 1 else "devices: 2 CPU devices, mesh data 2") in proc.stdout
        runs[n] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm"):
        got = {n: [r[key] for r in rs if key in r] for n, rs in runs.items()}
        assert len(got[1]) == 20 and np.allclose(got[2], got[1], rtol=1e-5, atol=0), key


def test_cpu_devices_that_do_not_divide_the_batch_are_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config", "debug", "train.cpu_devices=3",
                           "train.batch_size=8", "model.vocab_size=128", f"train.out_dir={tmp_path / 'r'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.batch_size 8 is not divisible by the 3 devices "
                                                    "(on a CPU host: set train.cpu_devices to a divisor of it)")
