"""The options that make the seed presets train like the tutorials' code:
MLP hidden dropout (seed 001), PyTorch's default init (seed 002), and seed
003's block without an output projection or a feed-forward residual
(their logits and gradients are in test_model_parity.OPTIONS /
GRADIENT_OPTIONS, their training in test_training_parity)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_diff, tokens_for, twins

import jaxgpt.model as jm
import jaxgpt.ops as jops
import torchgpt.model as tm
import torchgpt.ops as tops
from gptcore.config import ConfigError, ModelConfig
from gptcore.formats import FormatError
from gptcore.formats.hf_config import config_to_hf
from gptcore.presets import load_model_config

DEBUG = load_model_config("debug")


@pytest.mark.parametrize("mlp", ["relu", "swiglu"])
def test_mlp_dropout_gradients_with_the_same_injected_masks(monkeypatch, kernels, mlp):
    """Dropout on the hidden activations, the same keep-masks injected into
    both twins (one per layer, in call order): equal gradients; other masks
    give other gradients, so the masks are really applied."""
    cfg = DEBUG.replace(mlp=mlp, mlp_dropout=0.3, mlp_bias=True, qkv_bias=True)
    tmodel, params = twins(cfg)
    tokens = tokens_for(cfg, length=17)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def masks_for(seed):
        masks = {}

        def keep(rate, shape):
            i = len(masks)
            masks[i] = np.random.default_rng(seed + i).random(int(np.prod(shape))).reshape(shape) >= rate
            return masks[i]
        return masks, keep

    def jax_grads(keep):
        monkeypatch.setattr(jops, "dropout_keep_mask", lambda rng, rate, shape: jnp.asarray(keep(rate, shape)))

        def loss(p):
            out = jm.GPT(cfg, kernels=kernels).apply({"params": p}, jnp.asarray(x), deterministic=False,
                                                     rngs={"dropout": jax.random.PRNGKey(0)})
            return jops.cross_entropy(out.logits, jnp.asarray(y))
        return jm.state_arrays(jax.grad(loss)(params))

    masks, keep = masks_for(0)
    jgrads = jax_grads(keep)
    assert len(masks) == cfg.n_layers and masks[0].shape == (2, 16, cfg.d_ff)
    replay = iter(range(cfg.n_layers))
    monkeypatch.setattr(tops, "dropout_keep_mask", lambda rate, shape, device: torch.from_numpy(masks[next(replay)]))
    tmodel.train()
    tmodel.zero_grad()
    try:
        tops.cross_entropy(tmodel(torch.from_numpy(x).long()).logits, torch.from_numpy(y).long()).backward()
    finally:
        tmodel.eval()
    for name, p in tmodel.named_parameters():
        g = p.grad.numpy()
        assert max_diff(jgrads[name], g) / max(float(np.abs(g).max()), 1e-6) <= 1e-5, name
    other = jax_grads(masks_for(100)[1])
    assert max_diff(other["blocks.0.mlp.up.weight"], jgrads["blocks.0.mlp.up.weight"]) > 1e-3


def test_mlp_dropout_reaches_every_expert():
    """Under MoE every expert (and the shared one) drops its hidden units:
    training-mode outputs differ from eval mode in both twins, eval does not."""
    cfg = DEBUG.replace(n_experts=4, top_k=2, shared_expert=True, mlp_dropout=0.5)
    tmodel, params = twins(cfg)
    tokens = jnp.asarray(tokens_for(cfg))
    model = jm.GPT(cfg)
    evaluated = model.apply({"params": params}, tokens).logits
    trained = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert max_diff(trained.logits, evaluated) > 1e-2
    with torch.no_grad():
        t_eval = tmodel(torch.as_tensor(np.array(tokens)).long()).logits
        tmodel.train()
        t_train = tmodel(torch.as_tensor(np.array(tokens)).long()).logits
        tmodel.eval()
    assert max_diff(t_train, t_eval) > 1e-2 and max_diff(t_eval, evaluated) <= 1e-5


def torch_default_moments(arrays: dict, cfg: ModelConfig):
    """Check every weight of a torch_default model against nn.Linear's
    U(+-1/sqrt(fan_in)) (weights and biases) and nn.Embedding's N(0, 1)."""
    checked = 0
    for name, a in arrays.items():
        a = np.asarray(a, np.float64)
        if "emb" in name:  # N(0, 1)
            assert abs(a.mean()) < 0.05 and abs(a.std() - 1.0) < 0.05, name
        elif "norm" in name:  # ones and zeros
            assert np.all(a == (1.0 if name.endswith("weight") else 0.0)), name
        else:
            layer = name.rsplit(".", 1)[0]
            fan_in = arrays[f"{layer}.weight"].shape[-1]  # torch layout (out, in)
            bound = fan_in ** -0.5
            assert np.abs(a).max() <= bound, name
            if a.size >= 1000:
                assert np.abs(a).max() > 0.99 * bound, name
                assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound / np.sqrt(3), name
        checked += 1
    return checked


def test_torch_default_init_has_torchs_moments_in_both_twins():
    cfg = DEBUG.replace(d_model=64, d_ff=256, vocab_size=512, position="learned", qkv_bias=True, out_bias=True,
                        mlp_bias=True, n_experts=4, top_k=2, router_bias=True, init="torch_default",
                        norm="layernorm")
    torch.manual_seed(0)
    t = tm.state_arrays(tm.GPT(cfg))
    j = jm.state_arrays(jm.init_params(cfg, 0))
    assert set(t) == set(j)
    assert torch_default_moments(t, cfg) == torch_default_moments(j, cfg) == len(t)
    normal = jm.state_arrays(jm.init_params(cfg.replace(init="normal"), 0))
    assert np.abs(normal["blocks.0.attn.qkv_proj.bias"]).max() == 0.0  # the other init is really another


def test_seed003_block_cannot_be_exported_to_hf():
    """GPT-2 and Llama always project the heads and add the MLP to the
    residual stream: a model without either is a one-line error on export."""
    cfg = load_model_config("seed003_gpt")
    with pytest.raises(FormatError, match="cannot express attn_out_proj=False in HF gpt2"):
        config_to_hf(cfg, "gpt2", "float32")
    with pytest.raises(FormatError, match="cannot express ffn_residual=False in HF llama"):
        config_to_hf(DEBUG.replace(ffn_residual=False), "llama", "float32")
    with pytest.raises(ConfigError, match="attn_out_proj: False needs n_heads \\* head_dim == d_model"):
        DEBUG.replace(head_dim=4, attn_out_proj=False)
