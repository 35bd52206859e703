"""Fast paths for XLA:CPU, each the same function as its reference in
jaxgpt/ops.py (tested against it and against torch in
parity_tests/test_kernels_parity.py).

Chosen by the model's `kernels` option ("cpu"; "auto", the default, picks
them when JAX runs on the CPU). Why they exist, measured on nanoGPT's CPU
config (benchmarks/bench_train.py):

- XLA's CPU reductions over a short last axis are slow, so softmax row sums,
  norm means and the backward's row terms are matrix-vector products.
- The backward passes of the norm and of attention are written out: the
  attention one forms softmax's row term as flash attention does
  (sum_d out_d * d_out_d), on (B, K, G*T, D) blocks so no (T, S)-sized tensor
  is copied to another layout (1.5x faster attention at block 64).
- Dense layers run on a 2-D (N, C) view: the weight gradient x^T @ dy needs
  transposed copies, and XLA:CPU emits a 2-D transpose with its tiled kernel
  but an N-D one as a slow loop (a third of the step before this).

Shape legend as in jaxgpt/ops.py.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.ops import dropped


class Dense(nn.Dense):
    """nn.Dense on a 2-D (N, C) view of its input: same parameters, same result."""

    def __call__(self, x):  # (..., C) -> (..., features)
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.features)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """ops.masked_softmax in fewer passes: a hidden key's exp underflows to
    exactly 0 unless its whole row is hidden, and those rows are zeroed by
    one (..., T, 1) factor; the row sums are a matrix-vector product."""
    scores = scores.astype(jnp.float32) + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - scores.max(-1, keepdims=True))
    total = jnp.matmul(e, jnp.ones(e.shape[-1], e.dtype), precision="highest")[..., None]
    return e * (mask.any(-1, keepdims=True) / total)


# -- normalization -----------------------------------------------------------

def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, center: bool) -> jax.Array:
    """ops.norm with row means as matrix-vector products and a written-out backward."""
    return _norm(x, scale, bias, eps, center)


def _row_mean(x):  # full float32 even where fp32 matmuls default to TF32 / bf16 passes
    return jnp.matmul(x, jnp.full(x.shape[-1], 1.0 / x.shape[-1], x.dtype), precision="highest")[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, eps, center):
    return _norm_fwd(x, scale, bias, eps, center)[0]


def _norm_fwd(x, scale, bias, eps, center):
    h = x - _row_mean(x) if center else x
    rstd = jax.lax.rsqrt(_row_mean(h * h) + eps)
    normed = h * rstd
    out = normed * scale if bias is None else normed * scale + bias
    return out, (normed, rstd, scale, bias)


def _norm_bwd(eps, center, residuals, d_out):
    normed, rstd, scale, bias = residuals
    g = d_out * scale
    inner = g - normed * _row_mean(g * normed)
    d_x = rstd * (inner - _row_mean(g) if center else inner)
    rows = d_out.reshape(-1, d_out.shape[-1])
    ones = jnp.ones(rows.shape[0], d_out.dtype)
    d_scale = jnp.matmul(ones, rows * normed.reshape(rows.shape), precision="highest")
    return d_x, d_scale, None if bias is None else jnp.matmul(ones, rows, precision="highest")


_norm.defvjp(_norm_fwd, _norm_bwd)


# -- attention ---------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              keep: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
    """ops.attention with the backward written out (_attention_bwd)."""
    B, K, G, T, D = q.shape
    S = k.shape[2]
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    keep = None if keep is None else keep.reshape(B, K, G * T, S)
    return _attention(q.reshape(B, K, G * T, D), k, v, mask, keep, rate).reshape(B, K, G, T, D)


def _attention_probs(q, k, mask):
    scores = jnp.einsum("BKTD,BKSD->BKTS", q, k) * q.shape[-1] ** -0.5
    return masked_softmax(scores, mask)  # (B, K, G*T, S) float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, keep, rate):
    return _attention_fwd(q, k, v, mask, keep, rate)[0]


def _attention_fwd(q, k, v, mask, keep, rate):
    probs = _attention_probs(q, k, mask)
    out = jnp.einsum("BKTS,BKSD->BKTD", dropped(probs, keep, rate).astype(v.dtype), v)
    return out, (q, k, v, keep, probs, out)


def _attention_bwd(rate, residuals, d_out):
    """Softmax's backward as flash attention writes it: the row term
    sum_s p_s dp_s equals sum_d out_d d_out_d, a reduction over D on tensors
    at hand (as a matrix-vector product)."""
    q, k, v, keep, probs, out = residuals
    d_v = jnp.einsum("BKTS,BKTD->BKSD", dropped(probs, keep, rate).astype(v.dtype), d_out)
    d_probs = dropped(jnp.einsum("BKTD,BKSD->BKTS", d_out, v).astype(jnp.float32), keep, rate)
    row = jnp.matmul(d_out.astype(jnp.float32) * out.astype(jnp.float32), jnp.ones(out.shape[-1], jnp.float32),
                     precision="highest")
    d_scores = (probs * (d_probs - row[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
    d_q = jnp.einsum("BKTS,BKSD->BKTD", d_scores, k)
    d_k = jnp.einsum("BKTS,BKTD->BKSD", d_scores, q)
    return d_q, d_k, d_v, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
