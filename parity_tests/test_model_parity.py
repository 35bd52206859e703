"""Full-model parity: logits, per-head attention, MoE, gradients, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, jax_forward, logits_diff, max_diff, small, tokens_for, torch_forward, twins

import jaxgpt.model as jm
import jaxgpt.ops as jops
import torchgpt.model as tm
import torchgpt.ops as tops
from gptcore.presets import load_model_config, preset_names

DEBUG = load_model_config("debug")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_full_logits(name):
    cfg = small(load_model_config(name))
    assert logits_diff(cfg) <= TOL


def test_seed000_parameter_counts_match_the_text():
    """Seed 000 reports 0.566035M and 10.606294M parameters; both twins agree exactly."""
    for name, expected in [("seed000_shijing", 566_035), ("seed000_poems", 10_606_294)]:
        cfg = load_model_config(name)
        assert jm.count_params(jm.param_shapes(cfg)) == expected
        assert tm.count_params(tm.GPT(cfg)) == expected


OPTIONS = {
    "learned": dict(position="learned"),
    "sinusoidal": dict(position="sinusoidal"),
    "rope": dict(position="rope", rope_base=500.0),
    "rope_llama3_scaling": dict(position="rope", rope_scaling="llama3", rope_factor=4.0, rope_original_context=8),
    "no_positions": dict(position="none"),
    "fused_qkv": dict(qkv_fused=True),
    "separate_qkv_bias": dict(qkv_fused=False, qkv_bias=True, out_bias=True),
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "head_dim_not_d_over_h": dict(n_heads=3, n_kv_heads=3, head_dim=10),
    "relu": dict(mlp="relu", mlp_bias=True),
    "gelu": dict(mlp="gelu"),
    "gelu_tanh": dict(mlp="gelu_tanh"),
    "swiglu": dict(mlp="swiglu", mlp_bias=True),
    "moe": dict(n_experts=4, top_k=2),
    "moe_shared_router_bias": dict(n_experts=4, top_k=3, shared_expert=True, router_bias=True),
    "moe_top1": dict(n_experts=3, top_k=1),
    "layernorm": dict(norm="layernorm", norm_eps=1e-5),
    "layernorm_no_bias": dict(norm="layernorm", norm_bias=False),
    "rmsnorm_torch_default_eps": dict(norm="rmsnorm", norm_eps=float(np.finfo(np.float32).eps)),
    "post_norm": dict(norm_placement="post"),
    "tied": dict(tie_embeddings=True),
    "tied_with_bias": dict(tie_embeddings=True, lm_head_bias=True),
    "untied_with_bias": dict(tie_embeddings=False, lm_head_bias=True),
    "no_attn_out_proj": dict(attn_out_proj=False),  # seed 003's concatenated heads
    "no_ffn_residual": dict(ffn_residual=False),  # seed 003's block
    "no_ffn_residual_post_norm": dict(ffn_residual=False, norm_placement="post"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_option_full_logits(option, kernels):
    assert logits_diff(DEBUG.replace(**OPTIONS[option]), kernels=kernels) <= TOL


@pytest.mark.parametrize("scan,remat", [(True, False), (True, True), (False, True)])
def test_scan_and_remat_compute_the_same_function(scan, remat):
    tmodel, params = twins(DEBUG)
    tokens = tokens_for(DEBUG)
    if scan:
        params = jm.stack_layers(params, DEBUG.n_layers)
    out = jm.GPT(DEBUG, scan_layers=scan, remat=remat).apply({"params": params}, jnp.asarray(tokens))
    assert max_diff(out.logits, torch_forward(tmodel, tokens).logits) <= TOL


def test_torch_jax_torch_round_trip_is_bit_exact():
    for name in preset_names():
        cfg = small(load_model_config(name))
        tmodel, params = twins(cfg)
        state = tm.state_arrays(tmodel)
        back = jm.state_arrays(params)
        assert back.keys() == state.keys()
        for key in state:
            assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key]), key
        stacked = jm.stack_layers(params, cfg.n_layers)  # the scanned layout maps to the same names
        assert all(np.array_equal(jm.state_arrays(stacked)[k], state[k]) for k in state)


# -- attention: GQA grouping, per head ---------------------------------------

@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_per_head_outputs(n_kv_heads):
    """With out_proj = identity the attention output is the concatenation of
    the heads, so every head is compared on its own."""
    cfg = DEBUG.replace(n_kv_heads=n_kv_heads, out_bias=False, position="rope")
    torch.manual_seed(0)
    tattn = tm.Attention(cfg).eval()
    with torch.no_grad():
        tattn.out_proj.weight.copy_(torch.eye(cfg.d_model))
    params = {k: {"kernel": v.detach().numpy().T} for k, v in
              ((n.split(".")[0], p) for n, p in tattn.named_parameters())}
    x = np.random.default_rng(0).normal(size=(2, 7, cfg.d_model)).astype(np.float32)
    pos = np.broadcast_to(np.arange(7, dtype=np.int32), (2, 7))
    mask = np.array(jops.attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.ones((2, 7), bool)))
    jout, _ = jm.Attention(cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))
    with torch.no_grad():
        tout, _ = tattn(torch.from_numpy(x), torch.from_numpy(pos.copy()), torch.from_numpy(mask))
    jh = np.asarray(jout).reshape(2, 7, cfg.n_heads, cfg.head_dim)
    th = tout.numpy().reshape(2, 7, cfg.n_heads, cfg.head_dim)
    for h in range(cfg.n_heads):
        assert max_diff(jh[:, :, h], th[:, :, h]) <= TOL, f"head {h}"


# -- mixture of experts ------------------------------------------------------

def test_router_ties_pick_the_lower_index_in_both_twins():
    rng = np.random.default_rng(0)
    logits = rng.integers(-2, 3, size=(64, 8)).astype(np.float32)  # many exact ties
    logits[0] = 1.0  # all tied
    for k in (1, 2, 3, 8):
        jw, ji = jops.route(jnp.asarray(logits), k)
        tw, ti = tops.route(torch.from_numpy(logits), k)
        assert np.array_equal(np.asarray(ji), ti.numpy())
        assert max_diff(jw, tw) <= 1e-6
        # lower index first: among equal logits the chosen ids are increasing
        vals = np.take_along_axis(logits, np.asarray(ji), -1)
        same = vals[:, 1:] == vals[:, :-1]
        assert np.all(np.diff(np.asarray(ji), axis=-1)[same] > 0)
    assert np.array_equal(np.asarray(jops.route(jnp.asarray(logits[:1]), 3)[1]), [[0, 1, 2]])


def test_moe_layer_with_tied_router_columns_shared_expert_and_aux_loss():
    cfg = DEBUG.replace(n_experts=4, top_k=2, shared_expert=True, router_bias=False)
    torch.manual_seed(0)
    tmoe = tm.MoE(cfg).eval()
    with torch.no_grad():  # experts 1 and 3 get identical router rows: every token ties them
        tmoe.router.weight[3] = tmoe.router.weight[1]
    state = {k: v.detach().numpy() for k, v in tmoe.state_dict().items()}
    template = jax.eval_shape(lambda: jm.MoE(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, cfg.d_model)),
                                                       jnp.ones((1, 2), bool)))["params"]
    from gptcore.weights import torch_to_jax
    params = torch_to_jax(state, template)
    x = np.random.default_rng(1).normal(size=(2, 9, cfg.d_model)).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[1, 6:] = False
    jout, jaux, jz, jshares = jm.MoE(cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(valid))
    with torch.no_grad():
        tout, taux, tz, tshares = tmoe(torch.from_numpy(x), torch.from_numpy(valid))
        tlogits = tmoe.router(torch.from_numpy(x))
    _, tidx = tops.route(tlogits, cfg.top_k)
    _, jidx = jops.route(jnp.asarray(tlogits.numpy()), cfg.top_k)
    assert np.array_equal(np.asarray(jidx), tidx.numpy())
    for row in np.asarray(jidx).reshape(-1, cfg.top_k).tolist():  # tied 1 and 3: 1 always comes first
        assert 3 not in row or (1 in row and row.index(1) < row.index(3)), row
    assert max_diff(jout, tout) <= TOL
    assert abs(float(jaux) - float(taux)) <= 1e-6
    assert float(jz) > 0.0 and abs(float(jz) - float(tz)) <= 1e-6 * float(tz)
    want = np.bincount(np.asarray(jidx)[valid].ravel(), minlength=cfg.n_experts + 1) / (valid.sum() * cfg.top_k)
    np.testing.assert_allclose(np.asarray(jshares), want, atol=1e-7)  # valid assignments per expert; none dropped
    np.testing.assert_allclose(tshares.numpy(), want, atol=1e-7)


# -- gradients ---------------------------------------------------------------

GRADIENT_OPTIONS = {  # DEBUG is pre-RMSNorm; jaxgpt.cpu_kernels.norm has a hand-written backward
    "dense": {},
    "seed003_block": {"attn_out_proj": False, "ffn_residual": False, "mlp": "gelu"},
    "moe": {"n_experts": 4, "top_k": 2, "shared_expert": True},
    "layernorm_post": {"norm": "layernorm", "norm_placement": "post", "mlp": "gelu"},
    "layernorm_no_bias": {"norm": "layernorm", "norm_bias": False},
}


@pytest.mark.parametrize("option", GRADIENT_OPTIONS)
def test_gradients_of_the_loss_for_every_parameter(option, kernels):
    cfg = DEBUG.replace(position="learned", aux_loss_coef=0.01, qkv_bias=True, mlp_bias=True,
                        **GRADIENT_OPTIONS[option])
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg, length=17)
    x, y = tokens[:, :-1], tokens[:, 1:]
    valid = np.ones(x.shape, bool)
    valid[1, 10:] = False

    def jloss(p):
        out = jm.GPT(cfg, kernels=kernels).apply({"params": p}, jnp.asarray(x), valid=jnp.asarray(valid))
        return jops.cross_entropy(out.logits, jnp.asarray(y), jnp.asarray(valid)) + cfg.aux_loss_coef * out.aux_loss

    jgrads = jm.state_arrays(jax.grad(jloss)(params))
    tmodel.zero_grad()
    out = tmodel(torch.from_numpy(x).long(), valid=torch.from_numpy(valid))
    loss = tops.cross_entropy(out.logits, torch.from_numpy(y).long(), torch.from_numpy(valid))
    (loss + cfg.aux_loss_coef * out.aux_loss).backward()
    for name, p in tmodel.named_parameters():
        g = p.grad.numpy()
        scale = max(float(np.abs(g).max()), 1e-6)
        assert max_diff(jgrads[name], g) / scale <= 1e-5, name


def test_gradients_through_attention_dropout_gqa_and_empty_rows(monkeypatch, kernels):
    """jaxgpt's CPU attention has a hand-written backward
    (jaxgpt.cpu_kernels._attention_bwd): with the same injected dropout masks,
    grouped-query heads and a fully padded sequence (rows with no visible
    key), its gradients, and the reference path's, are torch autograd's."""
    cfg = DEBUG.replace(position="rope", n_kv_heads=DEBUG.n_heads // 2, attn_dropout=0.25, qkv_bias=True)
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg, batch=3, length=17)
    x, y = tokens[:, :-1], tokens[:, 1:]
    valid = np.ones(x.shape, bool)
    valid[1, 11:] = False
    valid[2, :] = False  # no visible key anywhere in this sequence
    masks = {}

    def keep(rate, shape):  # one mask per call, the same for both twins (call order: layer by layer)
        i = len(masks)
        masks[i] = np.random.default_rng(i).random(int(np.prod(shape))).reshape(shape) >= rate
        return masks[i]

    monkeypatch.setattr(jops, "dropout_keep_mask", lambda rng, rate, shape: jnp.asarray(keep(rate, shape)))

    def jloss(p):
        out = jm.GPT(cfg, kernels=kernels).apply({"params": p}, jnp.asarray(x), valid=jnp.asarray(valid),
                                                 deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
        return jops.cross_entropy(out.logits, jnp.asarray(y), jnp.asarray(valid))

    jgrads = jm.state_arrays(jax.grad(jloss)(params))
    assert len(masks) == cfg.n_layers
    replay = iter(range(cfg.n_layers))
    monkeypatch.setattr(tops, "dropout_keep_mask", lambda rate, shape, device: torch.from_numpy(masks[next(replay)].reshape(shape)))
    tmodel.train()
    tmodel.zero_grad()
    try:
        out = tmodel(torch.from_numpy(x).long(), valid=torch.from_numpy(valid))
        tops.cross_entropy(out.logits, torch.from_numpy(y).long(), torch.from_numpy(valid)).backward()
    finally:
        tmodel.eval()
    for name, p in tmodel.named_parameters():
        g = p.grad.numpy()
        scale = max(float(np.abs(g).max()), 1e-6)
        assert max_diff(jgrads[name], g) / scale <= 1e-5, name


# -- padding -----------------------------------------------------------------

@pytest.mark.parametrize("position", ["learned", "rope"])
def test_padded_positions_never_change_logits_at_valid_positions(position, kernels):
    cfg = DEBUG.replace(position=position)
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg, length=12)
    valid = np.ones(tokens.shape, bool)
    valid[0, 8:] = False  # right padding
    valid[1, :3] = False  # left padding
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    other = tokens.copy()
    other[~valid] = (other[~valid] + 7) % cfg.vocab_size  # change only the padding
    kw = dict(positions=positions, valid=valid)
    for forward in (lambda t: jax_forward(cfg, params, t, kernels, **kw).logits,
                    lambda t: torch_forward(tmodel, t, **kw).logits):
        a, b = np.asarray(forward(tokens)), np.asarray(forward(other))
        assert max_diff(a[valid], b[valid]) == 0.0
        assert np.isfinite(a).all()
    # a left-padded row gives the logits of the same tokens unpadded
    alone = jax_forward(cfg, params, tokens[1:, 3:], kernels).logits
    padded = jax_forward(cfg, params, tokens, kernels, **kw).logits
    assert max_diff(padded[1, 3:], alone[0]) <= TOL
    assert max_diff(padded, torch_forward(tmodel, tokens, **kw).logits) <= TOL


def test_kv_cache_prefill_and_decode_match_full_forward():
    cfg = DEBUG
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg, length=10)
    full = jax_forward(cfg, params, tokens).logits
    jcache = jm.init_cache(cfg, 2, 16)
    tcache = tm.init_cache(cfg, 2, 16)
    steps = [(0, 6), (6, 7), (7, 8), (8, 10)]
    for lo, hi in steps:
        jout = jax_forward(cfg, params, tokens[:, lo:hi], cache=jcache)
        with torch.no_grad():
            tout = tmodel(torch.from_numpy(tokens[:, lo:hi]).long(), cache=tcache)
        jcache, tcache = jout.cache, tout.cache
        assert max_diff(jout.logits, full[:, lo:hi]) <= TOL
        assert max_diff(tout.logits, full[:, lo:hi]) <= TOL


def test_position_registries_cover_the_config():
    """Every position kind the config accepts is registered in both twins,
    and every RoPE scaling in gptcore.rope (and nothing else)."""
    import jaxgpt.positions as jpos
    import torchgpt.positions as tpos
    from gptcore import rope
    from gptcore.config import POSITIONS, ROPE_SCALINGS
    assert set(jpos.KINDS) == set(tpos.KINDS) == set(POSITIONS)
    assert set(rope.SCALINGS) == set(ROPE_SCALINGS)


@pytest.mark.parametrize("name", preset_names())
def test_budget_param_count_equals_both_twins(name):
    """gptcore.budget counts without building (and without a loop over
    layers or experts); both twins agree with it at full size."""
    from gptcore.budget import param_count
    cfg = load_model_config(name)
    with torch.device("meta"):
        assert param_count(cfg) == tm.count_params(tm.GPT(cfg)) == jm.count_params(jm.param_shapes(cfg))
