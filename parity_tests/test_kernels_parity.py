"""jaxgpt's XLA:CPU fast paths (jaxgpt.cpu_kernels) against the autodiff
reference (jaxgpt.ops), op by op, values and gradients; the full-model tests
in test_model_parity.py hold both paths to torch (the `kernels` fixture)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_diff

import jaxgpt.cpu_kernels as fast
import jaxgpt.layers as layers
import jaxgpt.model as jm
import jaxgpt.ops as ref
from gptcore.presets import load_model_config

GRAD_TOL = 1e-5  # relative to the largest gradient entry


def rel_diff(a, b) -> float:
    return max_diff(a, b) / max(float(np.abs(np.asarray(b)).max()), 1e-6)


def both(fn_of_ops, *args):
    """(fast, reference) values and gradients w.r.t. every argument of fn_of_ops(ops, *args) -> scalar."""
    results = []
    for ops in (fast, ref):
        value, grads = jax.value_and_grad(lambda *a: fn_of_ops(ops, *a), argnums=tuple(range(len(args))))(*args)
        results.append((value, grads))
    return results


@pytest.mark.parametrize("center,with_bias", [(True, True), (True, False), (False, False)])
def test_norm_values_and_gradients(center, with_bias):
    rng = np.random.default_rng(0)
    x = jnp.asarray(100.0 + rng.normal(size=(3, 7, 32)), jnp.float32)  # a large mean: two-pass variance needed
    scale = jnp.asarray(1.0 + 0.1 * rng.normal(size=32), jnp.float32)
    bias = jnp.asarray(0.1 * rng.normal(size=32), jnp.float32) if with_bias else None
    weights = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)  # a loss that weighs every output

    def loss(ops, x, scale, *b):
        return (ops.norm(x, scale, b[0] if b else None, 1e-5, center) * weights).sum()

    args = (x, scale) + ((bias,) if with_bias else ())
    (vf, gf), (vr, gr) = both(loss, *args)
    assert max_diff(fast.norm(x, scale, bias, 1e-5, center), ref.norm(x, scale, bias, 1e-5, center)) <= 1e-4
    for a, b in zip(gf, gr):
        assert rel_diff(a, b) <= GRAD_TOL


def test_masked_softmax_with_empty_rows():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(2, 3, 5, 6)) * 4, jnp.float32)
    mask = jnp.asarray(rng.random((2, 3, 5, 6)) < 0.6)
    mask = mask.at[0, 1, 2].set(False)  # a row with no visible key: zeros in both
    f, r = fast.masked_softmax(scores, mask), ref.masked_softmax(scores, mask)
    assert max_diff(f, r) <= 1e-6 and float(jnp.abs(f[0, 1, 2]).max()) == 0.0


@pytest.mark.parametrize("with_dropout", [False, True])
def test_attention_values_and_gradients(with_dropout):
    """GQA (K=2, G=3), a padded sequence and an empty row, optional dropout masks."""
    rng = np.random.default_rng(0)
    B, K, G, T, D = 2, 2, 3, 6, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((B, K, G, T, D), (B, K, T, D), (B, K, T, D)))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.ones((B, T), bool).at[1, :2].set(False)  # left padding: row 0 of sequence 1 sees no key
    mask = ref.attention_mask(pos, pos, valid)
    keep = jnp.asarray(rng.random((B, K, G, T, T)) >= 0.3) if with_dropout else None
    weights = jnp.asarray(rng.normal(size=(B, K, G, T, D)), jnp.float32)

    def loss(ops, q, k, v):
        return (ops.attention(q, k, v, mask, keep, 0.3) * weights).sum()

    (vf, gf), (vr, gr) = both(loss, q, k, v)
    assert max_diff(fast.attention(q, k, v, mask, keep, 0.3), ref.attention(q, k, v, mask, keep, 0.3)) <= 1e-5
    for a, b in zip(gf, gr):
        assert rel_diff(a, b) <= GRAD_TOL


def test_model_kernel_choice():
    """"auto" is the CPU kernels on the CPU; the two paths give one function,
    and an unknown choice is refused."""
    cfg = load_model_config("debug")
    params = jm.init_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    assert jax.default_backend() == "cpu" and layers.kernel_ops("auto") is fast and layers.kernel_ops("reference") is ref
    out = {k: jm.GPT(cfg, kernels=k).apply({"params": params}, tokens).logits for k in ("reference", "cpu")}
    assert max_diff(out["reference"], out["cpu"]) <= 1e-5
    with pytest.raises(ValueError, match="kernels must be one of"):
        layers.kernel_ops("triton")
