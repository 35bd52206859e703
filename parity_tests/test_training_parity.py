"""The two trainers take the same steps: from identical weights and batches,
jaxgpt.step.train_step and torchgpt.step.train_step agree on losses,
gradient norms and parameters over 100 steps of warmup + cosine, with
clipping active and two accumulated micro-batches. Pins the PARITY.md traps
of AdamW defaults, clipping's epsilon, the schedule's off-by-one, the decay
mask and accumulating gradients (not updates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgpt.model as jm
import jaxgpt.ops as jops
import jaxgpt.optim as jopt
import jaxgpt.step as jt
import torchgpt.model as tm
import torchgpt.ops as tops
import torchgpt.optim as topt
import torchgpt.step as tt
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig, lr_at
from gptcore.weights import jax_to_torch

CFG = ModelConfig(vocab_size=32, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  position="learned", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                  tie_embeddings=False, lm_head_bias=True, mlp_dropout=0.2)  # the same masks in both: see runs
TC = TrainConfig(batch_size=4, grad_accum=2, max_steps=100, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                 beta1=0.9, beta2=0.95, adam_eps=1e-8, weight_decay=0.1, grad_clip=0.3)
RTOL = 1e-4


def batch_at(step: int, cfg: ModelConfig = CFG, tc: TrainConfig = TC):
    """A learnable (A, B, T) batch: noisy counting sequences mod vocab."""
    rng = np.random.default_rng(step)
    A, B, T = tc.grad_accum, tc.batch_size, cfg.context_length
    start = rng.integers(0, cfg.vocab_size, (A, B, 1))
    seq = (start + np.arange(T + 1)) % cfg.vocab_size
    seq = np.where(rng.random(seq.shape) < 0.1, rng.integers(0, cfg.vocab_size, seq.shape), seq)
    return seq[..., :-1].astype(np.int32), seq[..., 1:].astype(np.int32), np.ones((A, B, T), bool)


def twins(cfg: ModelConfig = CFG, seed: int = 0):
    torch.manual_seed(seed)
    tmodel = tm.GPT(cfg)
    params = jm.load_state_arrays(tm.state_arrays(tmodel), cfg)
    return tmodel, params


def rel_err(a: dict, b: dict) -> float:
    """|a - b| / |b| over all parameters (torch-named numpy dicts). Per
    tensor, Adam's sign-like steps on near-zero gradients of small biases
    amplify fp32 rounding to ~1e-4 of their tiny norms; see max_abs_err."""
    diff = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    return (diff / sum(float(np.sum(b[k] ** 2)) for k in b)) ** 0.5


def max_abs_err(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b)


@pytest.fixture(scope="module")
def runs():
    """100 steps of each trainer from the same weights on the same batches,
    with MLP dropout: each layer's keep-mask is injected into both twins (jax
    traces the step once, so every step and micro-batch reuses the layer's
    mask; torch replays them layer by layer)."""
    tmodel, params = twins()
    masks = [np.random.default_rng(i).random((TC.batch_size, CFG.context_length, CFG.d_ff)) >= CFG.mlp_dropout
             for i in range(CFG.n_layers)]
    calls = iter(range(10 ** 9))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jops, "dropout_keep_mask", lambda rng, rate, shape: jnp.asarray(masks[next(calls) % 2]))
        patch.setattr(tops, "dropout_keep_mask", lambda rate, shape, device: torch.from_numpy(masks[next(calls) % 2]))
        step_fn = jax.jit(jt.step_fn, donate_argnums=0)  # traced here, with the masks
        state = jt.create_state(jm.GPT(CFG), params, TC)
        optimizer = topt.make_optimizer(tmodel, TC)
        jax_metrics, torch_metrics = [], []
        for step in range(TC.max_steps):
            x, y, valid = batch_at(step)
            state, m = step_fn(state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid)), jt.step_key(0, step))
            jax_metrics.append({k: float(v) for k, v in m.items()})
            calls = iter(range(10 ** 9))  # torch: layer 0, layer 1 for each micro-batch
            torch_metrics.append(tt.train_step(tmodel, optimizer, tuple(map(torch.from_numpy, (x, y, valid))), step,
                                               TC))
    return jax_metrics, torch_metrics, jm.state_arrays(state.params), tm.state_arrays(tmodel)


def test_losses_agree_over_100_steps(runs):
    jax_metrics, torch_metrics, _, _ = runs
    jl = np.array([m["loss"] for m in jax_metrics])
    tl = np.array([m["loss"] for m in torch_metrics])
    np.testing.assert_allclose(jl, tl, rtol=RTOL)
    assert tl[-10:].mean() < tl[:10].mean() - 0.5  # it learned something


def test_clipping_was_active_and_grad_norms_agree(runs):
    jax_metrics, torch_metrics, _, _ = runs
    jn = np.array([m["grad_norm"] for m in jax_metrics])
    tn = np.array([m["grad_norm"] for m in torch_metrics])
    np.testing.assert_allclose(jn, tn, rtol=RTOL)
    assert (tn > TC.grad_clip).sum() >= 50  # clipping scaled most steps


def test_params_agree_after_100_steps(runs):
    _, _, jax_params, torch_params = runs
    assert set(jax_params) == set(torch_params)
    assert rel_err(jax_params, torch_params) <= RTOL
    assert max_abs_err(jax_params, torch_params) <= RTOL  # parameters are O(0.02 .. 1)


def test_logged_lr_is_the_schedule(runs):
    jax_metrics, torch_metrics, _, _ = runs
    expected = np.array([lr_at(s, TC) for s in range(TC.max_steps)])
    np.testing.assert_allclose([m["lr"] for m in torch_metrics], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose([m["lr"] for m in jax_metrics], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("tc", [TC, TrainConfig(max_steps=600, warmup_steps=0, lr=6e-4, min_lr=6e-5),
                                TrainConfig(max_steps=2000, lr_decay_steps=1500, warmup_steps=100, lr=1e-3,
                                            min_lr=1e-4)],
                         ids=["tiny", "no-warmup", "decay-before-end"])
def test_optax_schedule_equals_lr_at_at_every_step(tc):
    steps = np.arange(tc.max_steps + 20)
    optax_lr = np.asarray(jax.vmap(jopt.lr_schedule(tc))(jnp.asarray(steps)))
    expected = np.array([lr_at(int(s), tc) for s in steps])
    np.testing.assert_allclose(optax_lr, expected, rtol=0, atol=1e-9)
    # nanoGPT's conventions: the first step already moves, the peak is reached after warmup
    assert lr_at(0, tc) == tc.lr / (tc.warmup_steps + 1)
    assert lr_at(tc.warmup_steps, tc) == tc.lr and lr_at(tc.decay_steps, tc) == tc.min_lr


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "lm_head_bias": False},
                                     {"n_experts": 4, "top_k": 2, "router_bias": True, "shared_expert": True,
                                      "mlp": "swiglu", "norm": "rmsnorm", "position": "rope"}],
                         ids=["untied-biases", "tied", "moe"])
def test_decay_masks_name_the_same_parameters(changes):
    cfg = CFG.replace(**changes)
    tmodel, params = twins(cfg)
    mask = jopt.decay_mask(params)
    as_arrays = jax.tree_util.tree_map(lambda p, m: np.full(p.shape, m), params, mask)
    jax_names = {k for k, v in jax_to_torch(as_arrays).items() if v.all()}
    assert jax_names == topt.decay_names(tmodel)
    assert "tok_emb.weight" in jax_names and not any("norm" in n or n.endswith("bias") for n in jax_names)


def padded_batch(rng, A, B, T):
    """Rows with different numbers of valid positions, so the micro-batches'
    token counts differ."""
    x = rng.integers(0, CFG.vocab_size, (A, B, T)).astype(np.int32)
    y = rng.integers(0, CFG.vocab_size, (A, B, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, (A, B))
    valid = np.arange(T)[None, None, :] < lengths[..., None]
    return x, y, valid


def test_grad_accumulation_equals_one_big_batch():
    """Two accumulated micro-batches of 4 == one batch of 8, in both twins,
    even when the micro-batches hold different numbers of valid tokens."""
    tc1 = TC.replace(grad_accum=1, batch_size=8)
    batches = [padded_batch(np.random.default_rng(s), 2, 4, CFG.context_length) for s in range(3)]
    merged = [tuple(a.reshape(1, 8, -1) for a in b) for b in batches]
    results = {}
    cfg = CFG.replace(mlp_dropout=0.0)  # the two layouts draw different masks
    for name, tc, bs in (("accum", TC, batches), ("big", tc1, merged)):
        tmodel, params = twins(cfg)
        state = jt.create_state(jm.GPT(cfg), params, tc)
        optimizer = topt.make_optimizer(tmodel, tc)
        for step, b in enumerate(bs):
            state, m = jt.train_step(state, tuple(map(jnp.asarray, b)), jt.step_key(0, step))
            tt.train_step(tmodel, optimizer, tuple(map(torch.from_numpy, b)), step, tc)
        results[name] = (jm.state_arrays(state.params), tm.state_arrays(tmodel))
    assert rel_err(results["accum"][0], results["big"][0]) <= 1e-5
    assert rel_err(results["accum"][1], results["big"][1]) <= 1e-5
    assert rel_err(results["accum"][0], results["accum"][1]) <= RTOL
