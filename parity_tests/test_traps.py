"""Every forward-pass trap of PARITY.md, sprung in ONE twin, is caught.

Each test reintroduces a trap (by monkeypatching one twin, or by changing one
twin's weights the way a wrong converter would) and asserts that the
comparison the parity suite makes now fails. Together with the passing
parity tests this shows the suite would notice the regression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TOL, jax_forward, max_diff, tokens_for, torch_forward, twins

import gptcore.weights as weights
import jaxgpt.model as jm
import jaxgpt.ops as jops
import torchgpt.model as tm
import torchgpt.ops as tops
from gptcore.presets import load_model_config
from gptcore.transforms import IDENTITY

DEBUG = load_model_config("debug")


def jax_vs_torch(cfg, **kw) -> float:
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg)
    return max_diff(jax_forward(cfg, params, tokens, **kw).logits, torch_forward(tmodel, tokens, **kw).logits)


def test_gelu_tanh_in_one_twin_is_caught(monkeypatch):
    cfg = DEBUG.replace(mlp="gelu")
    assert jax_vs_torch(cfg) <= TOL
    exact = jops.activation
    monkeypatch.setattr(jops, "activation", lambda name, x: exact("gelu_tanh" if name == "gelu" else name, x))
    assert jax_vs_torch(cfg) > TOL


def test_tiled_kv_heads_in_one_twin_are_caught(monkeypatch):
    cfg = DEBUG.replace(n_heads=4, n_kv_heads=2)
    assert jax_vs_torch(cfg) <= TOL

    exact = tops.attention

    def tiled(q, k, v, mask, keep=None, rate=0.0):  # query head h reads kv head h % K instead of h // G
        B, K, G, T, D = q.shape
        q = q.reshape(B, G, K, T, D).transpose(1, 2)  # flat head h = g*K + k now sits at [k, g]
        out = exact(q, k, v, mask, keep, rate)
        return out.transpose(1, 2).reshape(B, K, G, T, D)

    monkeypatch.setattr(tops, "attention", tiled)
    assert jax_vs_torch(cfg) > TOL


@pytest.mark.parametrize("kind,framework_default", [("rmsnorm", None), ("layernorm", 1e-6)])
def test_another_norm_eps_in_one_twin_is_caught(monkeypatch, kind, framework_default):
    """torch RMSNorm's default eps is the dtype's machine epsilon and Flax's
    norms use 1e-6; a twin falling back to its framework's default differs
    where activations are small."""
    cfg = DEBUG.replace(norm=kind, norm_eps=1e-5)
    x = (1e-3 * np.random.default_rng(0).normal(size=(2, 5, cfg.d_model))).astype(np.float32)
    params = {"scale": np.ones(cfg.d_model, np.float32)} | ({"bias": np.zeros(cfg.d_model, np.float32)}
                                                             if kind == "layernorm" else {})
    jy = np.asarray(jm.Norm(cfg).apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        assert max_diff(jy, tm.Norm(cfg)(torch.from_numpy(x)).numpy()) <= TOL
        wrong = (nn.RMSNorm(cfg.d_model, eps=framework_default) if kind == "rmsnorm"
                 else nn.LayerNorm(cfg.d_model, eps=framework_default))
        assert max_diff(jy, wrong(torch.from_numpy(x)).numpy()) > TOL


def test_untransposed_linear_weights_are_caught(monkeypatch):
    """Forgetting the [out, in] <-> [in, out] transpose still loads square
    matrices; the logits then differ."""
    cfg = DEBUG.replace(qkv_fused=False, n_kv_heads=4, d_ff=DEBUG.d_model, mlp="relu", tie_embeddings=True)
    tmodel, _ = twins(cfg)
    state = tm.state_arrays(tmodel)
    monkeypatch.setitem(weights.LEAF_RULES, "kernel", ("weight", IDENTITY))
    params = jm.load_state_arrays(state, cfg)  # all kernels square: loads without complaint
    tokens = tokens_for(cfg)
    assert max_diff(jax_forward(cfg, params, tokens).logits, torch_forward(tmodel, tokens).logits) > TOL


def test_per_head_interleaved_qkv_order_is_caught():
    """The fused projection is [q | k | v]; a converter writing the per-head
    interleaved order (q0 k0 v0 q1 k1 v1 ...) gives other logits."""
    cfg = DEBUG.replace(qkv_fused=True, n_kv_heads=4)
    tmodel, params = twins(cfg)
    state = tm.state_arrays(tmodel)
    H, D = cfg.n_heads, cfg.head_dim
    key = "blocks.0.attn.qkv_proj.weight"
    w = state[key].reshape(3, H, D, -1)  # (qkv, H, D, C)
    state[key] = np.ascontiguousarray(w.transpose(1, 0, 2, 3).reshape(3 * H * D, -1))
    tokens = tokens_for(cfg)
    wrong = jm.load_state_arrays(state, cfg)
    assert max_diff(jax_forward(cfg, wrong, tokens).logits, torch_forward(tmodel, tokens).logits) > TOL


def test_higher_index_first_on_router_ties_is_caught(monkeypatch):
    logits = np.random.default_rng(0).integers(-1, 2, size=(32, 8)).astype(np.float32)

    def high_index_first(router_logits, top_k):
        flipped = torch.flip(router_logits, dims=[-1])
        w, idx = tops.__dict__["_stable_route"](flipped, top_k)
        return w, router_logits.shape[-1] - 1 - idx

    monkeypatch.setitem(tops.__dict__, "_stable_route", tops.route)
    monkeypatch.setattr(tops, "route", high_index_first)
    _, jidx = jops.route(jnp.asarray(logits), 3)
    _, tidx = tops.route(torch.from_numpy(logits), 3)
    assert not np.array_equal(np.asarray(jidx), tidx.numpy())


def test_fully_masked_rows_with_minus_inf_are_caught(monkeypatch):
    """A twin that masks with -inf turns an all-padding row into NaN; the
    padded-batch comparison the suite makes fails on it (NaN is never <= TOL)."""
    cfg = DEBUG
    valid = np.ones((2, 16), bool)
    valid[1, :] = False  # a fully padded sequence
    tmodel, params = twins(cfg)
    reference = jax_forward(cfg, params, tokens_for(cfg), valid=valid).logits
    assert max_diff(reference, torch_forward(tmodel, tokens_for(cfg), valid=valid).logits) <= TOL
    monkeypatch.setattr(tops, "masked_softmax",
                        lambda s, m: s.float().masked_fill(~m, float("-inf")).softmax(-1))
    assert not max_diff(reference, torch_forward(tmodel, tokens_for(cfg), valid=valid).logits) <= TOL


def test_dropout_with_the_same_injected_masks_agrees_and_other_masks_do_not(monkeypatch):
    """The two frameworks' RNGs never agree, so dropout is compared by
    injecting the same keep-masks into both twins, call by call."""
    cfg = DEBUG.replace(embd_dropout=0.1, attn_dropout=0.2, resid_dropout=0.3)
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg)

    def injector(seed):
        rng = np.random.default_rng(seed)
        return lambda rate, shape: rng.random(int(np.prod(shape))).reshape(shape) >= rate

    def run(jseed, tseed):
        jmask, tmask = injector(jseed), injector(tseed)
        monkeypatch.setattr(jops, "dropout_keep_mask", lambda rng, rate, shape: jnp.asarray(jmask(rate, shape)))
        monkeypatch.setattr(tops, "dropout_keep_mask", lambda rate, shape, device: torch.from_numpy(tmask(rate, shape)))
        jout = jm.GPT(cfg).apply({"params": params}, jnp.asarray(tokens), deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(0)})
        tmodel.train()
        try:
            with torch.no_grad():
                tout = tmodel(torch.from_numpy(tokens).long())
        finally:
            tmodel.eval()
        return max_diff(jout.logits, tout.logits)

    assert run(0, 0) <= TOL
    assert run(0, 1) > TOL
    assert jax_vs_torch(cfg) <= TOL  # eval mode: no dropout in either twin
