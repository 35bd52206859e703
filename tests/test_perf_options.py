"""The speed options of jaxgpt's training step compute the same thing:
train.dtype = "bfloat16" (float32 master weights), train.scan_layers,
train.remat and train.attention_impl ("xla" via jax.nn.dot_product_attention;
"cudnn" needs an NVIDIA GPU). Tiny configs: every step compiles in seconds."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt.step as js
from gptcore.config import ConfigError
from gptcore.presets import load_model_config
from gptcore.train_config import TrainConfig
from jaxgpt import train
from jaxgpt.checkpoint import load_model
from jaxgpt.model import GPT, init_params, stack_layers, unstack_layers

CFG = load_model_config("debug")  # GQA (4 heads, 2 kv heads), rope, swiglu, rmsnorm
TC = TrainConfig(batch_size=4, max_steps=100, warmup_steps=0, lr=1e-2)
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def batch(step: int):
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, CFG.vocab_size, (1, TC.batch_size, CFG.context_length + 1))
    x, y = jnp.asarray(tokens[..., :-1], jnp.int32), jnp.asarray(tokens[..., 1:], jnp.int32)
    return x, y, jnp.ones(x.shape, bool)


def train_losses(tc: TrainConfig, steps: int = 3):
    """Losses of `steps` steps from init_params(CFG, 0), and the final params (unrolled)."""
    params = init_params(CFG, 0)
    if tc.scan_layers:
        params = stack_layers(params, CFG.n_layers)
    state = js.create_state(js.make_model(CFG, tc), params, tc)
    losses = []
    for step in range(steps):
        state, metrics = js.train_step(state, batch(step), js.step_key(0, step))
        losses.append(float(metrics["loss"]))
    return np.array(losses), unstack_layers(jax.device_get(state.params))


@pytest.fixture(scope="module")
def reference():
    return train_losses(TC)


def test_bfloat16_step_runs_and_tracks_float32(reference):
    losses, params = train_losses(TC.replace(dtype="bfloat16"))
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, reference[0], rtol=2e-2)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))  # master weights stay fp32
    assert not np.array_equal(losses, reference[0])  # it did compute in bfloat16


@pytest.mark.parametrize("option", [dict(scan_layers=True), dict(scan_layers=True, remat=True),
                                    dict(attention_impl="xla")])
def test_option_trains_like_the_reference(reference, option):
    losses, params = train_losses(TC.replace(**option))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference[1])):
        np.testing.assert_allclose(a, b, atol=1e-4)  # Adam: a step is ~lr wherever grads are tiny


def test_dot_product_attention_matches_ours_with_padding():
    """jax.nn.dot_product_attention's xla path (implementation None == "xla")
    against our einsum attention: GQA, left padding, a fully padded row."""
    params = init_params(CFG, 1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 12)), jnp.int32)
    valid = jnp.ones((3, 12), bool).at[1, :5].set(False).at[2, :].set(False)
    ours = GPT(CFG).apply({"params": params}, tokens, valid=valid).logits
    theirs = GPT(CFG, attention_impl="xla").apply({"params": params}, tokens, valid=valid).logits
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_fused_attention_refuses_attention_dropout():
    model = GPT(CFG.replace(attn_dropout=0.1), attention_impl="xla")
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = init_params(CFG.replace(attn_dropout=0.1), 0)
    with pytest.raises(ValueError, match="attn_dropout"):
        model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})


def test_train_config_checks_attention_impl():
    with pytest.raises(ConfigError, match="attention_impl"):
        TrainConfig(attention_impl="flash")


def test_donated_state_is_reused():
    """train_step donates the state: XLA must be able to use every buffer
    (else jax warns "donated buffers were not usable" and copies)."""
    state = js.create_state(GPT(CFG), init_params(CFG, 0), TC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new_state, _ = js.train_step(state, batch(0), js.step_key(0, 0))
        jax.block_until_ready(new_state)
    assert not [w for w in caught if "donated" in str(w.message)]
    assert jax.tree_util.tree_leaves(state.params)[0].is_deleted()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs the offline tiny Shakespeare copy")
def test_scan_layers_run_writes_the_unrolled_layout(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    preset = tmp_path / "tiny.toml"  # debug's model, the vocabulary from the tokenizer
    preset.write_text("[model]\ncontext_length = 32\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\n"
                      "d_ff = 64\n", encoding="utf-8")
    out = tmp_path / "run"
    argv = ["--config", str(preset), f"data.corpus={corpus}", f"train.out_dir={out}", "train.scan_layers=true",
            "train.remat=true", "train.batch_size=4", "train.max_steps=2", "train.eval_interval=2",
            "train.eval_batches=1", "train.sample_tokens=4"]
    assert train.main(argv) == 0
    cfg, params, _ = load_model(out / "model")
    assert "blocks" not in params and f"blocks_{cfg.n_layers - 1}" in params


def test_scanned_model_decodes_with_the_cache_like_the_unrolled_one():
    """scan_layers stacks the per-layer KV cache for the scan and splits it
    after: prefill + one decode step give the unrolled model's logits and cache."""
    from jaxgpt.model import init_cache
    params = init_params(CFG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    results = []
    for scan, p in ((False, params), (True, stack_layers(params, CFG.n_layers))):
        model = GPT(CFG, scan_layers=scan)
        out = model.apply({"params": p}, tokens[:, :5], cache=init_cache(CFG, 2, 8))
        step = model.apply({"params": p}, tokens[:, 5:], cache=out.cache)
        results.append((out.logits, step.logits, step.cache))
    (logits, step_logits, cache), (s_logits, s_step_logits, s_cache) = results
    np.testing.assert_allclose(s_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_step_logits, step_logits, rtol=1e-5, atol=1e-5)
    assert len(s_cache["k"]) == CFG.n_layers and int(s_cache["end"]) == 6
    for a, b in zip(jax.tree_util.tree_leaves(s_cache), jax.tree_util.tree_leaves(cache)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(cache["k"][0][:, :, 5])).max() > 0  # the step wrote slot 5
