"""Pure functions of the model: positions, masks, activations, dropout.

Parallel text: torchgpt/ops.py. Shape legend: B batch, T query length,
S key length, H query heads, K key/value heads, G = H // K query heads per
key/value head, D head_dim, C d_model.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptcore.rope import rope_inv_freq
from jaxgpt.sharding import over_tokens

# -- positions ---------------------------------------------------------------

def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotate (B, T, N, D) by the angles of (B, T) integer positions and
    (D/2,) frequencies (gptcore.rope.rope_frequencies).

    Rotate-half layout (GPT-NeoX, HF Llama): dimension i pairs with i + D/2,
    x' = x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a].
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, D/2)
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
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)


# -- normalization -----------------------------------------------------------

def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, center: bool) -> jax.Array:
    """LayerNorm (center=True: two-pass variance, mean first) or RMSNorm
    (center=False) over the last axis, in x's dtype (float32 in the model)."""
    h = x - x.mean(-1, keepdims=True) if center else x
    normed = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + eps)
    return normed * scale if bias is None else normed * scale + bias


# -- attention ---------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              keep: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
    """softmax(q k^T / sqrt(D), mask) v, head-major, with grouped queries.

    (B, K, G, T, D) queries, (B, K, S, D) keys and values, (B, T, S) mask ->
    (B, K, G, T, D). `keep`: a (B, K, G, T, S) dropout keep-mask applied to
    the probabilities with `rate`. A key/value head's G query heads are one
    block of G*T rows, (B, K, G*T, D); autodiff writes the backward.
    """
    B, K, G, T, D = q.shape
    S = k.shape[2]
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = jnp.einsum("BKTD,BKSD->BKTS", q.reshape(B, K, G * T, D), k) * D ** -0.5  # (B, K, G*T, S)
    probs = dropped(masked_softmax(scores, mask), None if keep is None else keep.reshape(B, K, G * T, S), rate)
    return jnp.einsum("BKTS,BKSD->BKTD", probs.astype(v.dtype), v).reshape(B, K, G, T, D)


def dropped(probs: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """Attention dropout of the probabilities with a keep-mask (None: none)."""
    return probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)


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


# -- mixture-of-experts dispatch -------------------------------------------------

class Dispatch(NamedTuple):
    """Per group of N tokens, its N * k (token, choice) assignments sorted by
    expert, each expert's in token order."""
    token: jax.Array  # (G, N*k) the token (index in the group) of each assignment
    weight: jax.Array  # (G, N*k) its routing weight
    expert: jax.Array  # (G, N*k) its expert, ascending
    slot: jax.Array  # (G, N*k) its row in the group's (E * capacity) buffers; E * capacity: dropped
    sizes: jax.Array  # (G, E) assignments per expert, dropped ones included


def dispatch(top_idx: jax.Array, weights: jax.Array, n_experts: int, capacity: int) -> Dispatch:
    """(G, N, k) expert ids and routing weights -> the sorted assignments of
    each group; the first `capacity` of each expert keep a slot, the rest
    are dropped (the drop rule: within a group, by expert, then token)."""
    G, N, k = top_idx.shape
    expert = top_idx.reshape(G, N * k)
    order = jnp.argsort(expert, axis=-1, stable=True)
    expert = jnp.take_along_axis(expert, order, -1)
    sizes = jax.nn.one_hot(expert, n_experts, dtype=jnp.int32).sum(1)  # (G, E)
    position = jnp.arange(N * k) - jnp.take_along_axis(jnp.cumsum(sizes, -1) - sizes, expert, -1)  # rank in expert
    slot = jnp.where(position < capacity, expert * capacity + position, n_experts * capacity)
    return Dispatch(order // k, jnp.take_along_axis(weights.reshape(G, N * k), order, -1), expert, slot, sizes)


# -- dropout -----------------------------------------------------------------

def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask; the parity tests replace this function in both twins
    to inject the same mask."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rng is None (eval) or rate is 0. JAX has
    no global RNG, so the key is an argument where torchgpt's takes `training`
    (a deliberate difference: the masks come from each framework's RNG)."""
    if rng is None or rate == 0.0:
        return x
    keep = dropout_keep_mask(rng, rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# -- loss --------------------------------------------------------------------

def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, bias: jax.Array | None, targets: jax.Array,
                          valid: jax.Array, chunk: int) -> jax.Array:
    """cross_entropy(hidden @ kernel + bias, targets, valid) computed `chunk`
    tokens at a time: never more than (chunk, V) float32 logits alive. Under
    differentiation each slice's gradients are made while its logits exist
    (softmax - one_hot, then the two matmuls back to hidden and the head), so
    nothing is recomputed. On a mesh each device slices its own tokens
    (sharding.over_tokens): chunk tokens a slice, or all it holds if fewer.
    (B, T, C), (C, V), (V,) | None, (B, T), (B, T) -> ()."""
    b = jnp.zeros((kernel.shape[-1],), jnp.float32) if bias is None else bias
    total = over_tokens(functools.partial(_nll_sum, chunk=chunk), hidden, targets, valid, whole=(kernel, b))
    return total / jnp.maximum(valid.sum().astype(jnp.float32), 1.0)


def _nll_sum(hidden, targets, valid, kernel, b, chunk: int):
    """The summed weighted nll of chunked_cross_entropy."""
    C = hidden.shape[-1]
    h, y, v = hidden.reshape(-1, C), targets.reshape(-1), valid.reshape(-1).astype(jnp.float32)
    chunk = min(chunk, h.shape[0])
    pad = -h.shape[0] % chunk  # padding rows: weight 0
    h, y, v = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(y, (0, pad)), jnp.pad(v, (0, pad))
    return _chunked_nll_sum(h.reshape(-1, chunk, C), kernel, b, y.reshape(-1, chunk), v.reshape(-1, chunk))


def _slice_nll(h, kernel, b, y, v):
    """One slice's (float32 logits (n, V), logsumexp (n,), summed weighted nll ())."""
    logits = jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
    return logits, lse, jnp.sum((lse - target) * v)


@jax.custom_vjp
def _chunked_nll_sum(h, kernel, b, y, v):  # (S, n, C), (C, V), (V,), (S, n) x2 -> ()
    return jax.lax.map(lambda a: _slice_nll(a[0], kernel, b, a[1], a[2])[2], (h, y, v)).sum()


def _chunked_nll_sum_fwd(h, kernel, b, y, v):
    def one(grads, args):  # d nll / d (kernel, b) summed over slices; d nll / d h per slice
        hs, ys, vs = args
        logits, lse, nll = _slice_nll(hs, kernel, b, ys, vs)
        d = (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(ys, logits.shape[-1])) * vs[:, None]  # (n, V)
        dh = jnp.dot(d.astype(hs.dtype), kernel.T.astype(hs.dtype), preferred_element_type=jnp.float32)
        dk = jnp.dot(hs.T, d.astype(hs.dtype), preferred_element_type=jnp.float32)
        return (grads[0] + dk, grads[1] + d.sum(0)), (nll, dh.astype(hs.dtype))

    axes = _varying(h)  # under shard_map: the devices the tokens vary over (the sums' carry must too)
    zeros = tuple(_vary(jnp.zeros(a.shape, jnp.float32), axes) for a in (kernel, b))
    (dk, db), (nlls, dh) = jax.lax.scan(one, zeros, (h, y, v))
    return nlls.sum(), (dh, dk.astype(kernel.dtype), db.astype(b.dtype))


def _chunked_nll_sum_bwd(res, g):
    """Under shard_map each device's dk, db sum its own tokens: added up here,
    once (the kernel and bias are the same on every device)."""
    dh, dk, db = res
    dk, db = (jax.lax.psum(g * d, axes) if (axes := _varying(d)) else g * d for d in (dk, db))
    return (g * dh).astype(dh.dtype), dk.astype(res[1].dtype), db.astype(res[2].dtype), None, None


_chunked_nll_sum.defvjp(_chunked_nll_sum_fwd, _chunked_nll_sum_bwd)


def _varying(x) -> tuple[str, ...]:
    """The shard_map axes x varies over (jax >= 0.10: manual_axis_type; before: vma)."""
    aval = jax.typeof(x)
    kinds = getattr(aval, "manual_axis_type", None)
    return tuple(sorted(kinds.varying if kinds is not None else getattr(aval, "vma", ())))


def _vary(x, axes: tuple[str, ...]):
    if not axes:
        return x
    return jax.lax.pcast(x, axes, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(x, axes)


def cross_entropy(logits: jax.Array, targets: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over valid positions. (B, T, V), (B, T) -> ()."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    if valid is None:
        return nll.mean()
    valid = valid.astype(jnp.float32)
    return (nll * valid).sum() / jnp.maximum(valid.sum(), 1.0)

