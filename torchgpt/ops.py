"""Pure functions of the model: positions, masks, activations, dropout.

Parallel text: jaxgpt/ops.py. Shape legend: B batch, T query length,
S key length, H query heads, K key/value heads, G = H // K query heads per
key/value head, D head_dim, C d_model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from gptcore.rope import rope_inv_freq

# -- positions ---------------------------------------------------------------

def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq) -> torch.Tensor:
    """Rotate (B, T, N, D) by the angles of (B, T) integer positions and
    (D/2,) frequencies (gptcore.rope.rope_frequencies).

    Rotate-half layout (GPT-NeoX, HF Llama): dimension i pairs with i + D/2,
    x' = x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a].
    """
    angles = positions.float()[..., None] * torch.as_tensor(inv_freq, device=x.device)  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T) positions -> (B, T, dim) table of Vaswani et al.:
    pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(p / 10000^(2i/dim))."""
    inv_freq = torch.from_numpy(rope_inv_freq(dim, 10000.0)).to(positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(*positions.shape, dim)


# -- masks -------------------------------------------------------------------

def attention_mask(q_positions: torch.Tensor, kv_positions: torch.Tensor,
                   kv_valid: torch.Tensor) -> torch.Tensor:
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


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in float32 where `mask` is True.

    One policy for a row with no visible key (a query whose keys are all
    padding): its weights are all zero, so its attention output is zero, never
    NaN. Both twins implement exactly this.
    """
    scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    return scores.softmax(dim=-1).masked_fill(~mask, 0.0)


# -- normalization -----------------------------------------------------------

def norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, eps: float, center: bool) -> torch.Tensor:
    """LayerNorm (center=True) or RMSNorm (center=False) over the last axis,
    torch's own kernels with an explicit eps."""
    if center:
        return F.layer_norm(x, x.shape[-1:], scale, bias, eps)
    return F.rms_norm(x, x.shape[-1:], scale, eps)


# -- attention ---------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              keep: torch.Tensor | None = None, rate: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), mask) v, head-major, with grouped queries.

    (B, K, G, T, D) queries, (B, K, S, D) keys and values, (B, T, S) mask ->
    (B, K, G, T, D). `keep`: a (B, K, G, T, S) dropout keep-mask applied to
    the probabilities with `rate`. A key/value head's G query heads are one
    block of G*T rows, (B, K, G*T, D); autograd writes the backward.
    """
    B, K, G, T, D = q.shape
    S = k.shape[2]
    mask = mask[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    scores = (q.reshape(B, K, G * T, D) @ k.transpose(-2, -1)) * D ** -0.5  # (B, K, G*T, S)
    probs = dropped(masked_softmax(scores, mask), None if keep is None else keep.reshape(B, K, G * T, S), rate)
    return (probs.to(v.dtype) @ v).view(B, K, G, T, D)


def dropped(probs: torch.Tensor, keep: torch.Tensor | None, rate: float) -> torch.Tensor:
    """Attention dropout of the probabilities with a keep-mask (None: none)."""
    return probs if keep is None else torch.where(keep, probs / (1.0 - rate), 0.0)


# -- activations -------------------------------------------------------------

def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """relu | gelu (exact, erf) | gelu_tanh | silu. jax.nn.gelu defaults to the
    tanh approximation; torch's GELU() is exact: the name says which."""
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x, approximate="none")
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


# -- mixture of experts ------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., E) float32 router logits -> (..., k) weights, (..., k) expert ids.

    Weights are the softmax over the top-k logits (seed 002; equal to
    Mixtral's softmax-then-renormalise). Among tied logits the lower expert
    index wins: torch.topk leaves the order of ties unspecified, so a stable
    descending sort picks them, matching jax.lax.top_k.
    """
    top_logits, top_idx = torch.sort(router_logits, dim=-1, descending=True, stable=True)
    top_logits, top_idx = top_logits[..., :top_k], top_idx[..., :top_k]
    return top_logits.softmax(dim=-1), top_idx


# -- mixture-of-experts dispatch -------------------------------------------------

class Dispatch(NamedTuple):
    """Per group of N tokens, its N * k (token, choice) assignments sorted by
    expert, each expert's in token order."""
    token: torch.Tensor  # (G, N*k) the token (index in the group) of each assignment
    weight: torch.Tensor  # (G, N*k) its routing weight
    expert: torch.Tensor  # (G, N*k) its expert, ascending
    slot: torch.Tensor  # (G, N*k) its row in the group's (E * capacity) buffers; E * capacity: dropped
    sizes: torch.Tensor  # (G, E) assignments per expert, dropped ones included


def dispatch(top_idx: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int) -> Dispatch:
    """(G, N, k) expert ids and routing weights -> the sorted assignments of
    each group; the first `capacity` of each expert keep a slot, the rest
    are dropped (the drop rule: within a group, by expert, then token)."""
    G, N, k = top_idx.shape
    expert = top_idx.reshape(G, N * k)
    order = torch.argsort(expert, dim=-1, stable=True)
    expert = torch.gather(expert, -1, order)
    sizes = F.one_hot(expert, n_experts).sum(1)  # (G, E)
    position = torch.arange(N * k, device=expert.device) - torch.gather(torch.cumsum(sizes, -1) - sizes, -1, expert)
    slot = torch.where(position < capacity, expert * capacity + position, n_experts * capacity)
    return Dispatch(order // k, torch.gather(weights.reshape(G, N * k), -1, order), expert, slot, sizes)


# -- dropout -----------------------------------------------------------------

def dropout_keep_mask(rate: float, shape: tuple[int, ...], device) -> torch.Tensor:
    """Boolean keep mask; the parity tests replace this function in both twins
    to inject the same mask."""
    return torch.rand(shape, device=device) >= rate


def dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Inverted dropout; identity in eval mode or when rate is 0. The mask
    comes from torch's global RNG, where jaxgpt's takes an explicit key (a
    deliberate difference: the masks come from each framework's RNG)."""
    if not training or rate == 0.0:
        return x
    keep = dropout_keep_mask(rate, tuple(x.shape), x.device)
    return torch.where(keep, x / (1.0 - rate), 0.0).to(x.dtype)


# -- loss --------------------------------------------------------------------

def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets, valid) computed
    `chunk` tokens at a time: never more than (chunk, V) float32 logits
    alive. When gradients are wanted each slice's are made while its logits
    exist (softmax - one_hot, then the two matmuls back to hidden and the
    head), so nothing is recomputed. (B, T, C), (V, C), (V,) | None, (B, T), (B, T) -> ()."""
    v = valid.reshape(-1).float()
    y = targets.reshape(-1).long().clamp(min=0)  # the batches' int32 ids index as int64
    total = _ChunkedNllSum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, y, v, chunk)
    return total / v.sum().clamp(min=1.0)


def _slice_nll(h, weight, bias, y, v):
    """One slice's (float32 logits (n, V), logsumexp (n,), summed weighted nll ())."""
    logits = h.float() @ weight.float().T
    logits = logits if bias is None else logits + bias.float()
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, y[:, None])[:, 0]
    return logits, lse, torch.sum((lse - target) * v)


class _ChunkedNllSum(torch.autograd.Function):
    """The summed nll of (N, C) hidden rows, slice by slice, with the
    gradients made in the forward pass (jaxgpt's custom_vjp twin)."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, v, chunk):  # (N, C), (V, C), (V,) | None, (N,), (N,) -> ()
        wants = any(ctx.needs_input_grad[:3])
        total = h.new_zeros((), dtype=torch.float32)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if wants else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if wants else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if wants else None
        for i in range(0, h.shape[0], chunk):
            hs, ys, vs = h[i:i + chunk], y[i:i + chunk], v[i:i + chunk]
            logits, lse, nll = _slice_nll(hs, weight, bias, ys, vs)
            total += nll
            if wants:  # d nll / d logits = (softmax - one_hot) * valid, made in place in the logits' buffer
                d = logits.sub_(lse[:, None]).exp_()  # (n, V)
                d[torch.arange(len(ys), device=d.device), ys] -= 1.0
                d.mul_(vs[:, None])
                dh[i:i + chunk] = d @ weight.float()
                dw.addmm_(d.T, hs.float())
                db += d.sum(0)
        ctx.has_bias = bias is not None
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.save_for_backward(*((dh, dw, db) if wants else ()))
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw, db = ctx.saved_tensors
        return ((g * dh).to(ctx.dtypes[0]), (g * dw).to(ctx.dtypes[1]), g * db if ctx.has_bias else None,
                None, None, None)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over valid positions. (B, T, V), (B, T) -> ()."""
    logp = logits.float().log_softmax(dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    if valid is None:
        return nll.mean()
    valid = valid.float()
    return (nll * valid).sum() / valid.sum().clamp(min=1.0)
