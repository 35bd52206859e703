"""The decoder-only transformer in Flax linen.

Parallel text: torchgpt/model.py (same module names, same order, same shape
comments). Pure-functional: `GPT(cfg).apply(params, tokens, ...)` returns a
`ModelOutput(logits, cache, aux_loss, z_loss, routing)`; the KV cache is a plain dict pytree
passed in and returned, never a mutable collection.

Shape legend: B batch, T new tokens, S cached key slots, C d_model,
H query heads, K key/value heads, G = H // K, D head_dim, F d_ff, E experts,
L layers, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptcore.config import ModelConfig
from jaxgpt import ops
from jaxgpt.ffn import MLP, MoE, load_balancing_loss  # noqa: F401 (load_balancing_loss: the twins' API)
from jaxgpt.layers import dense, embedding_init, kernel_ops
from jaxgpt.positions import KINDS
from jaxgpt.sharding import constrain

Cache = dict[str, jax.Array]


class ModelOutput(NamedTuple):
    logits: jax.Array  # (B, T, V) float32
    cache: Cache | None  # updated KV cache, when one was passed in
    aux_loss: jax.Array  # () mean MoE load-balancing loss over layers (0 for dense MLPs)
    z_loss: jax.Array  # () mean router z-loss over layers (0 for dense MLPs)
    routing: jax.Array  # (E + 1,) share of the valid (token, choice) assignments each expert kept, the
    #                     dropped share last (MoE capacity); mean over layers; (0,) for dense MLPs
    hidden: jax.Array | None = None  # (B, T, C) float32 final states, instead of logits when head=False


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache of `max_len` slots.

    k, v: one (B, K, S, D) array per layer (head-major, as attention reads
    them; separate arrays, so a decode step updates each in place and copies
    none); positions: (B, S) position of each cached key;
    valid: (B, S) slot holds a real (non-padding) key; end: () next free slot.
    """
    kv_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {
        "k": tuple(jnp.zeros(kv_shape, dtype) for _ in range(cfg.n_layers)),
        "v": tuple(jnp.zeros(kv_shape, dtype) for _ in range(cfg.n_layers)),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "end": jnp.zeros((), jnp.int32),
    }


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32 with two-pass variance
    (mean first, then the mean of squared deviations): Flax's fast
    E[x^2] - E[x]^2 loses digits when |mean| >> std."""
    cfg: ModelConfig
    kernels: str = "auto"  # see kernel_ops

    @nn.compact
    def __call__(self, x):  # (..., C) -> (..., C)
        c = self.cfg
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        layernorm = c.norm == "layernorm"
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],)) if layernorm and c.norm_bias else None
        normed = kernel_ops(self.kernels).norm(x.astype(jnp.float32), scale, bias, c.norm_eps, center=layernorm)
        return normed.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query causal self-attention.

    Query head h reads key/value head h // G (repeat-interleave grouping,
    [k0, k0, k1, k1] for G = 2); queries are grouped as (K, G) instead of
    repeating K and V in memory.
    """
    cfg: ModelConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "einsum"  # see GPT
    kernels: str = "auto"  # see kernel_ops

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache=None, cache_end=None):
        c = self.cfg
        B, T, _ = x.shape
        H, K, D = c.n_heads, c.n_kv_heads, c.head_dim
        if c.qkv_fused:  # one projection, output laid out [q (H*D) | k (K*D) | v (K*D)]
            qkv = self.dense(c.d_model, c.q_dim + 2 * c.kv_dim, c.qkv_bias, "qkv_proj")(x)
            q, k, v = jnp.split(qkv, [c.q_dim, c.q_dim + c.kv_dim], axis=-1)
        else:
            q = self.dense(c.d_model, c.q_dim, c.qkv_bias, "q_proj")(x)
            k = self.dense(c.d_model, c.kv_dim, c.qkv_bias, "k_proj")(x)
            v = self.dense(c.d_model, c.kv_dim, c.qkv_bias, "v_proj")(x)
        q = constrain(q.reshape(B, T, H, D), "batch", "length", "act_heads", None)  # (B, T, H, D)
        k = constrain(k.reshape(B, T, K, D), "batch", "length", "act_kv_heads", None)  # (B, T, K, D)
        v = constrain(v.reshape(B, T, K, D), "batch", "length", "act_kv_heads", None)  # (B, T, K, D)
        q, k = KINDS[c.position].rotate(c, q, k, positions)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, D): head-major, as cached
        if layer_cache is not None:  # write the new keys at slots [end, end + T)
            k, v = (jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, cache_end, 0))
                    for cache, new in zip(layer_cache, (k, v)))
            layer_cache = (k, v)  # (B, K, S, D) each

        if self.attention_impl != "einsum":
            return self._out_proj(self._fused(q, k, v, mask).reshape(B, T, H * D)), layer_cache  # (B, T, C)

        q = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
        rng = self._rng(c.attn_dropout)
        keep = None if rng is None else ops.dropout_keep_mask(rng, c.attn_dropout, (B, K, H // K, T, k.shape[2]))
        out = kernel_ops(self.kernels).attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, keep, c.attn_dropout)
        out = constrain(out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D), "batch", "length", "act_heads")
        return self._out_proj(out.astype(self.dtype)), layer_cache  # (B, T, C)

    def _out_proj(self, out):  # (B, T, H*D) -> (B, T, C); attn_out_proj False: the concatenated heads (seed 003)
        c = self.cfg
        return self.dense(c.q_dim, c.d_model, c.out_bias, "out_proj", c.residual_init_std)(out) if c.attn_out_proj \
            else out

    def _fused(self, q, k, v, mask):
        """jax.nn.dot_product_attention: implementation "xla" (XLA's own
        formulation) or "cudnn" (cuDNN flash attention; bf16 / fp16 only,
        the boolean mask passed as a bias). (B, T, H, D), (B, K, S, D) x2,
        (B, T, S) -> (B, T, H, D); GQA groups heads as we do (h -> h // G)."""
        if not self.deterministic and self.cfg.attn_dropout > 0.0:
            raise ValueError(f"attention_impl={self.attention_impl!r} has no attention dropout: "
                             f"set attn_dropout = 0 or use attention_impl=\"einsum\"")
        k, v = (a.transpose(0, 2, 1, 3).astype(q.dtype) for a in (k, v))  # (B, S, K, D), its layout
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                           scale=self.cfg.head_dim ** -0.5, implementation=self.attention_impl)
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0.0)  # no visible key: zeros, as masked_softmax

    def _rng(self, rate):
        return None if self.deterministic or rate == 0.0 else self.make_rng("dropout")

    def dense(self, fan_in, features, bias, name, std=None):
        return dense(self.cfg, fan_in, features, bias, name, std, self.dtype, self.kernels)


class Block(nn.Module):
    """One transformer layer, pre-norm  x + f(norm(x))  or post-norm
    norm(x + f(x)). The signature fits nn.scan: (carry, per-layer input) ->
    (carry, per-layer output)."""
    cfg: ModelConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "einsum"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, valid, cache_end):
        c = self.cfg
        x = constrain(x, "batch", "length", "act_embed")  # (B, T, C)
        norm1, norm2 = Norm(c, self.kernels, name="norm1"), Norm(c, self.kernels, name="norm2")
        attn = Attention(c, self.deterministic, self.dtype, self.attention_impl, self.kernels, name="attn")
        mlp = (MoE if c.is_moe else MLP)(c, self.dtype, self.kernels, self.deterministic, name="mlp")

        def ffn(h):  # -> (out, [load balancing loss, z-loss, routing shares (E + 1) if MoE])
            if not c.is_moe:
                return mlp(h), jnp.zeros(2, jnp.float32)
            out, balance, z, shares = mlp(h, valid)
            return out, jnp.concatenate([jnp.stack([balance, z]), shares])

        if c.norm_placement == "pre":
            h, layer_cache = attn(norm1(x), positions, mask, layer_cache, cache_end)
            x = x + ops.dropout(h, c.resid_dropout, self._rng(c.resid_dropout))
            h, aux = ffn(norm2(x))
            x = (x if c.ffn_residual else 0.0) + ops.dropout(h, c.resid_dropout, self._rng(c.resid_dropout))
        else:
            h, layer_cache = attn(x, positions, mask, layer_cache, cache_end)
            x = norm1(x + ops.dropout(h, c.resid_dropout, self._rng(c.resid_dropout)))
            h, aux = ffn(x)
            x = norm2((x if c.ffn_residual else 0.0) + ops.dropout(h, c.resid_dropout, self._rng(c.resid_dropout)))
        return x, (layer_cache, aux)

    def _rng(self, rate):
        return None if self.deterministic or rate == 0.0 else self.make_rng("dropout")


class GPT(nn.Module):
    """Token (+ position) embeddings, n_layers blocks, final norm, lm head.

    scan_layers stacks the blocks' parameters on a leading L axis and runs
    them with nn.scan (one compiled layer body); remat recomputes each block's
    activations in the backward pass. attention_impl picks the attention
    kernel: "einsum" (ours, every feature), "xla" or "cudnn" (via
    jax.nn.dot_product_attention; no attention dropout; "cudnn" is cuDNN
    flash attention on NVIDIA GPUs, bf16 / fp16). kernels picks the norm,
    attention and Dense code (kernel_ops): the autodiff reference or the
    XLA:CPU fast paths. None of them changes the function computed.
    """
    cfg: ModelConfig
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    scan_layers: bool = False
    remat: bool = False
    attention_impl: str = "einsum"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, tokens, positions=None, valid=None, cache: Cache | None = None,
                 deterministic: bool = True, head: bool = True) -> ModelOutput:
        """tokens (B, T) int; positions (B, T) int (default: 0.. or the
        cache's next slots); valid (B, T) bool, False at padding. head=False
        returns the final states (hidden) instead of logits, for a loss that
        applies the head itself (lm_head_weights, ops.chunked_cross_entropy;
        training only: no cache)."""
        c = self.cfg
        B, T = tokens.shape
        offset = 0 if cache is None else cache["end"]
        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)[None, :] + offset
            positions = jnp.broadcast_to(positions, (B, T))
        if valid is None:
            valid = jnp.ones((B, T), bool)
        if cache is None:
            kv_positions, kv_valid, layer_caches = positions, valid, None
        else:
            kv_positions = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, offset))
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, offset))
            layer_caches = list(zip(cache["k"], cache["v"]))  # per layer: (B, K, S, D) k and v
        mask = ops.attention_mask(positions, kv_positions, kv_valid)  # (B, T, S)

        tok_emb = nn.Embed(c.vocab_size, c.d_model, name="tok_emb", embedding_init=embedding_init(c))
        x = tok_emb(tokens)  # (B, T, C)
        x = KINDS[c.position].embed(c, x, positions)  # (B, T, C)
        x = ops.dropout(x, c.embd_dropout, None if deterministic or c.embd_dropout == 0.0
                        else self.make_rng("dropout")).astype(self.dtype)
        x = constrain(x, "batch", "length", "act_embed")  # (B, T, C)

        block = nn.remat(Block) if self.remat else Block
        if self.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                             length=c.n_layers)
            stacked = None if cache is None else tuple(jnp.stack(a) for a in (cache["k"], cache["v"]))
            x, (stacked, aux) = blocks(c, deterministic, self.dtype, self.attention_impl, self.kernels, name="blocks")(
                x, stacked, positions, mask, valid, offset)  # cache (L, B, K, S, D): copied in and out
            if cache is not None:
                layer_caches = [(stacked[0][i], stacked[1][i]) for i in range(c.n_layers)]
        else:
            aux = []
            for i in range(c.n_layers):
                x, (layer_cache, layer_aux) = block(c, deterministic, self.dtype, self.attention_impl, self.kernels,
                                                    name=f"blocks_{i}")(
                    x, None if cache is None else layer_caches[i], positions, mask, valid, offset)
                if cache is not None:
                    layer_caches[i] = layer_cache
                aux.append(layer_aux)
            aux = jnp.stack(aux)

        if c.norm_placement == "pre":  # post-norm blocks already end in a norm
            x = Norm(c, self.kernels, name="norm_f")(x)
        aux = aux.mean(0)  # (L, 2 [+ E + 1]) -> (2 [+ E + 1],)
        if not head and not self.is_initializing():
            return ModelOutput(None, None, aux[0], aux[1], aux[2:], x.astype(jnp.float32))
        if c.tie_embeddings:
            logits = tok_emb.attend(x.astype(jnp.float32).reshape(B * T, -1)).reshape(B, T, -1)  # 2-D: see Dense
            if c.lm_head_bias:
                logits = logits + self.param("lm_head_bias", nn.initializers.zeros, (c.vocab_size,))
        else:
            logits = dense(c, c.d_model, c.vocab_size, c.lm_head_bias, "lm_head", kernels=self.kernels)(
                x.astype(jnp.float32))

        new_cache = None
        if cache is not None:
            new_cache = {"k": tuple(k for k, _ in layer_caches), "v": tuple(v for _, v in layer_caches),
                         "positions": kv_positions, "valid": kv_valid, "end": offset + T}
        logits = constrain(logits.astype(jnp.float32), "batch", "length", "act_vocab")
        return ModelOutput(logits, new_cache, aux[0], aux[1], aux[2:])


def lm_head_weights(params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array | None]:
    """The head GPT applies to its final states: kernel (C, V) and bias (V,)
    or None (tied: the token embedding's transpose)."""
    if cfg.tie_embeddings:
        return params["tok_emb"]["embedding"].T, params.get("lm_head_bias")
    return params["lm_head"]["kernel"], params["lm_head"].get("bias")


def init_params(cfg: ModelConfig, seed: int = 0, **model_kwargs) -> dict:
    """Freshly initialised parameters (float32)."""
    model = GPT(cfg, **model_kwargs)
    tokens = jnp.zeros((1, min(cfg.context_length, 8)), jnp.int32)
    return jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]


def count_params(params) -> int:
    """Parameters of a params tree (torchgpt's takes its model: each twin's weights holder)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def param_shapes(cfg: ModelConfig, **model_kwargs) -> dict:
    """The parameter tree as jax.ShapeDtypeStructs, without allocating it."""
    model = GPT(cfg, **model_kwargs)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]


def load_state_arrays(state, cfg: ModelConfig, **model_kwargs) -> dict:
    """Params holding numpy arrays given by torchgpt state_dict key (gptcore.weights' rules);
    missing, unexpected or mis-shaped keys raise."""
    from gptcore.weights import torch_to_jax
    tree = torch_to_jax(state, param_shapes(cfg, **model_kwargs))
    return jax.tree_util.tree_map(jnp.asarray, tree)


def state_arrays(params) -> dict:
    """The params as numpy arrays by torchgpt state_dict key (the twins' interchange form)."""
    from gptcore.weights import jax_to_torch
    return jax_to_torch(jax.device_get(params))


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unrolled params (blocks_0 .. blocks_{L-1}) -> the scan_layers layout (blocks, leading L axis)."""
    params = dict(params)
    layers = [params.pop(f"blocks_{i}") for i in range(n_layers)]
    params["blocks"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: dict) -> dict:
    """The scan_layers layout -> unrolled params; the canonical layout on disk."""
    if "blocks" not in params:
        return params
    params = dict(params)
    blocks = params.pop("blocks")
    n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
    for i in range(n):
        params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x: x[i], blocks)
    return params
