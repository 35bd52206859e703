"""Pure functions of the model: positions, masks, activations, dropout.

Parallel text: torchgpt/ops.py. Shape legend: B batch, T query length,
S key length, H query heads, K key/value heads, G = H // K query heads per
key/value head, D head_dim, C d_model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptcore.rope import rope_inv_freq

# -- positions ---------------------------------------------------------------

def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate (B, T, N, D) by the angles of (B, T) integer positions.

    Rotate-half layout (GPT-NeoX, HF Llama): dimension i pairs with i + D/2,
    x' = x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a].
    """
    inv_freq = jnp.asarray(rope_inv_freq(x.shape[-1], base))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
    """(B, T) positions -> (B, T, dim) table of Vaswani et al.:
    pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    inv_freq = jnp.asarray(rope_inv_freq(dim, 10000.0))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, dim/2)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)


# -- masks -------------------------------------------------------------------

def attention_mask(q_positions: jax.Array, kv_positions: jax.Array,
                   kv_valid: jax.Array) -> jax.Array:
    """Boolean (B, T, S): query t may attend to key s.

    Causal by position, so the same rule serves training and cached decoding:
    key s is visible when kv_positions[s] <= q_positions[t] and it is not
    padding. For positions 0..3 and no padding:

        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
    """
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]  # (B, T, S)
    return causal & kv_valid[:, None, :]


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32 where `mask` is True.

    One policy for a row with no visible key (a query whose keys are all
    padding): its weights are all zero, so its attention output is zero, never
    NaN. Both twins implement exactly this.
    """
    # softmax(where(mask, scores, min)) zeroed where masked, in fewer passes:
    # a hidden key's exp underflows to exactly 0 unless its whole row is
    # hidden, and those rows are zeroed by one (..., T, 1) factor. The row
    # sums are a matrix-vector product (XLA's CPU reductions over a short
    # last axis are slow).
    scores = scores.astype(jnp.float32) + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - scores.max(-1, keepdims=True))
    total = jnp.matmul(e, jnp.ones(e.shape[-1], e.dtype), precision="highest")[..., None]
    return e * (mask.any(-1, keepdims=True) / total)


# -- normalization -----------------------------------------------------------

def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, center: bool) -> jax.Array:
    """LayerNorm (center=True: two-pass variance, mean first) or RMSNorm
    (center=False) over the last axis, in x's dtype (float32 in the model).
    The backward is written out; row means are matrix-vector products, since
    XLA's CPU reductions over a short last axis are slow."""
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
    """softmax(q k^T / sqrt(D), mask) v, head-major, with grouped queries.

    (B, K, G, T, D) queries, (B, K, S, D) keys and values, (B, T, S) mask ->
    (B, K, G, T, D). `keep`: a (B, K, G, T, S) dropout keep-mask applied to
    the probabilities with `rate`. A key/value head's G query heads are one
    block of G*T rows, (B, K, G*T, D), so every product is a plain batched
    matmul and no (B, K, G, T, S) tensor needs a layout copy; the backward is
    written out (_attention_bwd).
    """
    B, K, G, T, D = q.shape
    S = k.shape[2]
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    keep = None if keep is None else keep.reshape(B, K, G * T, S)
    return _attention(q.reshape(B, K, G * T, D), k, v, mask, keep, rate).reshape(B, K, G, T, D)


def _attention_probs(q, k, mask):
    scores = jnp.einsum("BKTD,BKSD->BKTS", q, k) * q.shape[-1] ** -0.5
    return masked_softmax(scores, mask)  # (B, K, G*T, S) float32


def _dropped(probs, keep, rate):
    return probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, keep, rate):
    return _attention_fwd(q, k, v, mask, keep, rate)[0]


def _attention_fwd(q, k, v, mask, keep, rate):
    probs = _attention_probs(q, k, mask)
    out = jnp.einsum("BKTS,BKSD->BKTD", _dropped(probs, keep, rate).astype(v.dtype), v)
    return out, (q, k, v, keep, probs, out)


def _attention_bwd(rate, residuals, d_out):
    """Softmax's backward as flash attention writes it: the row term
    sum_s p_s dp_s equals sum_d out_d d_out_d, a reduction over D on tensors
    at hand (as a matrix-vector product: XLA's CPU reductions over a short
    axis are slow). ~1.5x faster than autodiff's form on CPU."""
    q, k, v, keep, probs, out = residuals
    d_v = jnp.einsum("BKTS,BKTD->BKSD", _dropped(probs, keep, rate).astype(v.dtype), d_out)
    d_probs = _dropped(jnp.einsum("BKTD,BKSD->BKTS", d_out, v).astype(jnp.float32), keep, rate)
    row = jnp.matmul(d_out.astype(jnp.float32) * out.astype(jnp.float32), jnp.ones(out.shape[-1], jnp.float32),
                     precision="highest")
    d_scores = (probs * (d_probs - row[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
    d_q = jnp.einsum("BKTS,BKSD->BKTD", d_scores, k)
    d_k = jnp.einsum("BKTS,BKTD->BKSD", d_scores, q)
    return d_q, d_k, d_v, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- activations -------------------------------------------------------------

def activation(name: str, x: jax.Array) -> jax.Array:
    """relu | gelu (exact, erf) | gelu_tanh | silu. jax.nn.gelu defaults to the
    tanh approximation; torch's GELU() is exact: the name says which."""
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":  # torch's formula; jax.nn.gelu's erfc form costs ~5x more on CPU
        return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2.0 ** -0.5, x.dtype)))
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


# -- mixture of experts ------------------------------------------------------

def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(..., E) float32 router logits -> (..., k) weights, (..., k) expert ids.

    Weights are the softmax over the top-k logits (seed 002; equal to
    Mixtral's softmax-then-renormalise). Among tied logits the lower expert
    index wins: lax.top_k's order, which the torch twin reproduces.
    """
    top_logits, top_idx = jax.lax.top_k(router_logits, top_k)
    return jax.nn.softmax(top_logits, axis=-1), top_idx


# -- dropout -----------------------------------------------------------------

def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask; the parity tests replace this function in both twins
    to inject the same mask."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rng is None (eval) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = dropout_keep_mask(rng, rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# -- loss --------------------------------------------------------------------

def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over valid positions. (B, T, V), (B, T) -> ()."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    if valid is None:
        return nll.mean()
    valid = valid.astype(jnp.float32)
    return (nll * valid).sum() / jnp.maximum(valid.sum(), 1.0)

