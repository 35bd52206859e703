"""The decoder-only transformer in PyTorch: the reference twin.

Parallel text: jaxgpt/model.py (same module names, same order, same shape
comments). `GPT(cfg)(tokens, ...)` returns a `ModelOutput(logits, cache,
aux_loss, z_loss, routing)`; the KV cache is a plain dict passed in and returned (its k / v
tensors are written in place).

Shape legend: B batch, T new tokens, S cached key slots, C d_model,
H query heads, K key/value heads, G = H // K, D head_dim, F d_ff, E experts,
L layers, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from gptcore.config import ModelConfig
from torchgpt import ops
from torchgpt.ffn import MLP, MoE, load_balancing_loss  # noqa: F401 (load_balancing_loss: the twins' API)
from torchgpt.positions import KINDS

Cache = dict[str, torch.Tensor]


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V) float32
    cache: Cache | None  # updated KV cache, when one was passed in
    aux_loss: torch.Tensor  # () mean MoE load-balancing loss over layers (0 for dense MLPs)
    z_loss: torch.Tensor  # () mean router z-loss over layers (0 for dense MLPs)
    routing: torch.Tensor  # (E + 1,) share of the valid (token, choice) assignments each expert kept, the
    #                        dropped share last (MoE capacity); mean over layers; (0,) for dense MLPs
    hidden: torch.Tensor | None = None  # (B, T, C) float32 final states, instead of logits when head=False


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None) -> Cache:
    """An empty KV cache of `max_len` slots.

    k, v: one (B, K, S, D) tensor per layer (head-major, as attention reads
    them); positions: (B, S) position of each cached key;
    valid: (B, S) slot holds a real (non-padding) key; end: () next free slot.
    """
    kv_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {
        "k": tuple(torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)),
        "v": tuple(torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)),
        "positions": torch.zeros((batch, max_len), dtype=torch.int32, device=device),
        "valid": torch.zeros((batch, max_len), dtype=torch.bool, device=device),
        "end": torch.zeros((), dtype=torch.int32),
    }


class Norm(nn.Module):
    """LayerNorm or RMSNorm with the config's eps (torch's module defaults
    differ: LayerNorm 1e-5, RMSNorm the dtype's machine epsilon). Parameters
    weight and bias, as nn.LayerNorm names them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        layernorm_bias = cfg.norm == "layernorm" and cfg.norm_bias
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if layernorm_bias else None

    def forward(self, x):  # (..., C) -> (..., C)
        c = self.cfg
        return ops.norm(x, self.weight, self.bias, c.norm_eps, center=c.norm == "layernorm")


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query causal self-attention.

    Query head h reads key/value head h // G (repeat-interleave grouping,
    [k0, k0, k1, k1] for G = 2); queries are grouped as (K, G) instead of
    repeating K and V in memory.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        if c.qkv_fused:  # one projection, output laid out [q (H*D) | k (K*D) | v (K*D)]
            self.qkv_proj = nn.Linear(c.d_model, c.q_dim + 2 * c.kv_dim, bias=c.qkv_bias)
        else:
            self.q_proj = nn.Linear(c.d_model, c.q_dim, bias=c.qkv_bias)
            self.k_proj = nn.Linear(c.d_model, c.kv_dim, bias=c.qkv_bias)
            self.v_proj = nn.Linear(c.d_model, c.kv_dim, bias=c.qkv_bias)
        if c.attn_out_proj:  # else the concatenated heads are the output (seed 003)
            self.out_proj = nn.Linear(c.q_dim, c.d_model, bias=c.out_bias)

    def forward(self, x, positions, mask, layer_cache=None, cache_end=None):
        c = self.cfg
        B, T, _ = x.shape
        H, K, D = c.n_heads, c.n_kv_heads, c.head_dim
        if c.qkv_fused:
            q, k, v = self.qkv_proj(x).split([c.q_dim, c.kv_dim, c.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, H, D)  # (B, T, H, D)
        k = k.view(B, T, K, D)  # (B, T, K, D)
        v = v.view(B, T, K, D)  # (B, T, K, D)
        q, k = KINDS[c.position].rotate(c, q, k, positions)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, D): head-major, as cached
        if layer_cache is not None:  # write the new keys at slots [end, end + T)
            layer_cache[0][:, :, cache_end:cache_end + T] = k
            layer_cache[1][:, :, cache_end:cache_end + T] = v
            k, v = layer_cache  # (B, K, S, D) each

        q = q.view(B, T, K, H // K, D).permute(0, 2, 3, 1, 4)  # (B, K, G, T, D)
        keep = None
        if self.training and c.attn_dropout > 0.0:
            keep = ops.dropout_keep_mask(c.attn_dropout, (B, K, H // K, T, k.shape[2]), x.device)
        out = ops.attention(q, k.to(q.dtype), v.to(q.dtype), mask, keep, c.attn_dropout)
        out = out.permute(0, 3, 1, 2, 4).reshape(B, T, H * D)  # (B, T, H*D)
        return (self.out_proj(out) if c.attn_out_proj else out), layer_cache  # (B, T, C)


class Block(nn.Module):
    """One transformer layer, pre-norm  x + f(norm(x))  or post-norm
    norm(x + f(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        self.norm1, self.norm2 = Norm(c), Norm(c)
        self.attn = Attention(c)
        self.mlp = MoE(c) if c.is_moe else MLP(c)

    def forward(self, x, layer_cache, positions, mask, valid, cache_end):
        c = self.cfg

        def ffn(h):  # -> (out, [load balancing loss, z-loss, routing shares (E + 1) if MoE])
            if not c.is_moe:
                return self.mlp(h), torch.zeros(2, device=h.device)
            out, balance, z, shares = self.mlp(h, valid)
            return out, torch.cat([torch.stack([balance, z]), shares])

        if c.norm_placement == "pre":
            h, layer_cache = self.attn(self.norm1(x), positions, mask, layer_cache, cache_end)
            x = x + ops.dropout(h, c.resid_dropout, self.training)
            h, aux = ffn(self.norm2(x))
            x = (x if c.ffn_residual else 0.0) + ops.dropout(h, c.resid_dropout, self.training)
        else:
            h, layer_cache = self.attn(x, positions, mask, layer_cache, cache_end)
            x = self.norm1(x + ops.dropout(h, c.resid_dropout, self.training))
            h, aux = ffn(x)
            x = self.norm2((x if c.ffn_residual else 0.0) + ops.dropout(h, c.resid_dropout, self.training))
        return x, (layer_cache, aux)


class GPT(nn.Module):
    """Token (+ position) embeddings, n_layers blocks, final norm, lm head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = KINDS[c.position](c)  # parameters only when learned
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        if c.norm_placement == "pre":  # post-norm blocks already end in a norm
            self.norm_f = Norm(c)
        if c.tie_embeddings:
            if c.lm_head_bias:
                self.lm_head_bias = nn.Parameter(torch.zeros(c.vocab_size))
        else:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)
        if c.init == "normal":  # else torch's own defaults, as the modules were built with
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # scaled residual init (seed 001, GPT-2)
                if name.endswith(("out_proj.weight", "down.weight")):
                    nn.init.normal_(p, mean=0.0, std=c.residual_init_std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens, positions=None, valid=None, cache: Cache | None = None,
                head: bool = True) -> ModelOutput:
        """tokens (B, T) int; positions (B, T) int (default: 0.. or the
        cache's next slots); valid (B, T) bool, False at padding. head=False
        returns the final states (hidden) instead of logits, for a loss that
        applies the head itself (lm_head_weights, ops.chunked_cross_entropy;
        training only: no cache)."""
        c = self.cfg
        B, T = tokens.shape
        offset = 0 if cache is None else int(cache["end"])
        if positions is None:
            positions = torch.arange(T, device=tokens.device)[None, :] + offset
            positions = positions.expand(B, T)
        if valid is None:
            valid = torch.ones((B, T), dtype=torch.bool, device=tokens.device)
        if cache is None:
            kv_positions, kv_valid, layer_caches = positions, valid, None
        else:
            # new positions / valid arrays (the caller's stay as they were); the k / v buffers are written
            # in place, so a decode step copies no cache (the jax twin gets the same by donating them)
            kv_positions = torch.cat([cache["positions"][:, :offset], positions.to(cache["positions"].dtype),
                                      cache["positions"][:, offset + T:]], dim=1)
            kv_valid = torch.cat([cache["valid"][:, :offset], valid, cache["valid"][:, offset + T:]], dim=1)
            layer_caches = list(zip(cache["k"], cache["v"]))  # per layer: (B, K, S, D) k and v
        mask = ops.attention_mask(positions, kv_positions, kv_valid)  # (B, T, S)

        x = self.tok_emb(tokens)  # (B, T, C)
        x = self.pos_emb(x, positions)  # (B, T, C)
        x = ops.dropout(x, c.embd_dropout, self.training)

        aux = []
        for i, block in enumerate(self.blocks):
            x, (_, layer_aux) = block(x, None if cache is None else layer_caches[i], positions, mask, valid, offset)
            aux.append(layer_aux)
        aux = torch.stack(aux)

        if c.norm_placement == "pre":
            x = self.norm_f(x)
        aux = aux.mean(0)  # (L, 2 [+ E + 1]) -> (2 [+ E + 1],)
        if not head:
            return ModelOutput(None, None, aux[0], aux[1], aux[2:], x.float())
        if c.tie_embeddings:
            logits = x.float() @ self.tok_emb.weight.float().T
            if c.lm_head_bias:
                logits = logits + self.lm_head_bias
        else:
            logits = self.lm_head(x)

        new_cache = None
        if cache is not None:
            new_cache = dict(cache, positions=kv_positions, valid=kv_valid,
                             end=torch.tensor(offset + T, dtype=torch.int32))
        return ModelOutput(logits.float(), new_cache, aux[0], aux[1], aux[2:])

    def lm_head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head forward applies to the final states: weight (V, C) and
        bias (V,) or None (tied: the token embedding)."""
        if self.cfg.tie_embeddings:
            return self.tok_emb.weight, getattr(self, "lm_head_bias", None)
        return self.lm_head.weight, self.lm_head.bias


def count_params(model: nn.Module) -> int:
    """Parameters of a model (jaxgpt's takes its params tree: each twin's weights holder)."""
    return sum(p.numel() for p in model.parameters())


def state_arrays(model: nn.Module) -> dict:
    """The state_dict as numpy arrays (the twins' interchange form)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_state_arrays(state, cfg: ModelConfig) -> GPT:
    """A model (eval mode) holding numpy arrays given by state_dict key;
    strict, so missing or unexpected keys raise."""
    model = GPT(cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model
