"""The feed-forward layers of a block in PyTorch: the MLP, and the
mixture of experts with its three dispatch implementations.

Parallel text: jaxgpt/ffn.py. Shape legend as torchgpt/model.py's; N
tokens of a group, R rows of an expert buffer.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from gptcore.config import ModelConfig
from torchgpt import ops


class MLP(nn.Module):
    """relu / gelu / gelu_tanh: down(act(up(x))); swiglu: down(silu(gate(x)) * up(x));
    mlp_dropout on the hidden activations before down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        if c.mlp == "swiglu":
            self.gate = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.up = nn.Linear(c.d_model, c.d_ff, bias=c.mlp_bias)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x):  # (..., C) -> (..., C)
        c = self.cfg
        if c.mlp == "swiglu":
            h = ops.activation("silu", self.gate(x)) * self.up(x)
        else:
            h = ops.activation(c.mlp, self.up(x))  # (..., F)
        return self.down(ops.dropout(h, c.mlp_dropout, self.training))


class MoE(nn.Module):
    """Top-k mixture of experts with an optional shared expert.

    The router runs in float32 (see ops.route). cfg.moe_impl says how tokens
    reach their experts; the parameters are the same:
    - "dense": every expert on every token, outputs combined with the
      (mostly zero) routing weights: the reference;
    - "capacity": the assignments sorted by expert (ops.dispatch) into
      (E, capacity, C) buffers, each expert on its buffer, outputs scattered
      back by weight; assignments past an expert's capacity are dropped;
    - "ragged": dropless, each expert on its run of the sorted rows (seed
      002's loop over experts, on contiguous rows), then back in token order.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        self.router = nn.Linear(c.d_model, c.n_experts, bias=c.router_bias)
        self.experts = nn.ModuleList(MLP(c) for _ in range(c.n_experts))
        if c.shared_expert:
            self.shared_expert = MLP(c)

    def forward(self, x, valid):  # (B, T, C), (B, T) -> (B, T, C), ()
        c = self.cfg
        logits = self.router(x.to(self.router.weight.dtype)).float()  # (B, T, E)
        weights, top_idx = ops.route(logits, c.top_k)  # (B, T, k) each
        choice = nn.functional.one_hot(top_idx, c.n_experts).float()  # (B, T, k, E)
        if c.moe_impl == "dense":
            combine = torch.einsum("BTk,BTkE->BTE", weights, choice)  # (B, T, E)
            expert_out = torch.stack([expert(x) for expert in self.experts])  # (E, B, T, C)
            out = torch.einsum("BTE,EBTC->BTC", combine.to(expert_out.dtype), expert_out)
        else:
            sparse = self._capacity if c.moe_impl == "capacity" else self._ragged
            out = sparse(x, top_idx, weights)
        if c.shared_expert:
            out = out + self.shared_expert(x)
        return out, load_balancing_loss(logits, choice, valid), router_z_loss(logits, valid)

    def _capacity(self, x, top_idx, weights):  # (B, T, C), (B, T, k) x2 -> (B, T, C)
        """Each sequence is a group with its own buffers: (B, E, capacity, C)."""
        c, (B, T, C) = self.cfg, x.shape
        cap = c.expert_capacity(T)
        plan = ops.dispatch(top_idx, weights, c.n_experts, cap)  # (B, T*k) each
        rows = torch.gather(x, 1, plan.token[..., None].expand(-1, -1, C))  # (B, T*k, C)
        buffers = x.new_zeros(B, c.n_experts * cap + 1, C).scatter(1, plan.slot[..., None].expand(-1, -1, C), rows)
        h = buffers[:, :-1].reshape(B, c.n_experts, cap, C)  # the last row took the dropped
        y = torch.stack([expert(h[:, e]) for e, expert in enumerate(self.experts)], 1)  # (B, E, cap, C)
        y = torch.cat([y.reshape(B, -1, C), y.new_zeros(B, 1, C)], 1)
        y = torch.gather(y, 1, plan.slot[..., None].expand(-1, -1, C)) * plan.weight[..., None].to(y.dtype)
        return y.new_zeros(B, T, C).scatter_add(1, plan.token[..., None].expand(-1, -1, C), y)

    def _ragged(self, x, top_idx, weights):  # (B, T, C), (B, T, k) x2 -> (B, T, C)
        """The whole batch is one group, dropless: each expert on its run of
        the rows sorted by expert (torch.cat of the runs)."""
        c, (B, T, C) = self.cfg, x.shape
        N = B * T
        plan = ops.dispatch(top_idx.reshape(1, N, -1), weights.reshape(1, N, -1), c.n_experts, N)
        token, weight, sizes = plan.token[0], plan.weight[0], plan.sizes[0].tolist()
        rows = x.reshape(N, C)[token]  # (N*k, C) in expert order
        ends = itertools.accumulate(sizes)
        y = torch.cat([expert(rows[end - n:end]) for expert, n, end in zip(self.experts, sizes, ends)])
        return y.new_zeros(N, C).index_add(0, token, y * weight[:, None].to(y.dtype)).reshape(B, T, C)


def router_z_loss(logits, valid):
    """ST-MoE's router z-loss, the mean over valid tokens of
    logsumexp(router logits)^2: it keeps the router's logits small.
    (B, T, E), (B, T) -> ()."""
    w = valid.float()
    return torch.sum(torch.logsumexp(logits, dim=-1) ** 2 * w) / w.sum().clamp(min=1.0)


def load_balancing_loss(logits, choice, valid):
    """Switch / Mixtral auxiliary loss: E * sum_{k,e} f[k, e] * P[e], where
    f is the fraction of (valid) tokens whose k-th choice is expert e and P the
    mean router probability of e. (B, T, E), (B, T, k, E), (B, T) -> ()."""
    w = valid.float()
    n = w.sum().clamp(min=1.0)
    f = torch.einsum("BTkE,BT->kE", choice, w) / n  # (k, E)
    p = torch.einsum("BTE,BT->E", logits.softmax(dim=-1), w) / n  # (E,)
    return logits.shape[-1] * torch.sum(f * p[None, :])
