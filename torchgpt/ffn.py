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
    - "ragged": dropless, the rows sorted by expert through
      torch._grouped_mm (else each expert on its run of rows), then back in
      token order.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = self.cfg = cfg
        self.router = nn.Linear(c.d_model, c.n_experts, bias=c.router_bias)
        self.experts = nn.ModuleList(MLP(c) for _ in range(c.n_experts))
        if c.shared_expert:
            self.shared_expert = MLP(c)

    def forward(self, x, valid):  # (B, T, C), (B, T) -> (B, T, C), (), (), (E + 1,)
        """The layer's output, its load-balancing and router z-losses, and
        where the valid (token, choice) assignments went (routing_shares)."""
        c = self.cfg
        logits = self.router(x.to(self.router.weight.dtype)).float()  # (B, T, E)
        weights, top_idx = ops.route(logits, c.top_k)  # (B, T, k) each
        choice = nn.functional.one_hot(top_idx, c.n_experts).float()  # (B, T, k, E)
        if c.moe_impl == "dense":
            combine = torch.einsum("BTk,BTkE->BTE", weights, choice)  # (B, T, E)
            expert_out = torch.stack([expert(x) for expert in self.experts])  # (E, B, T, C)
            out = torch.einsum("BTE,EBTC->BTC", combine.to(expert_out.dtype), expert_out)
        elif c.moe_impl == "capacity":
            out, shares = self._capacity(x, top_idx, weights, valid)
        else:
            out = self._ragged(x, top_idx, weights)
        if c.moe_impl != "capacity":  # dropless: every assignment kept
            shares = routing_shares(top_idx, valid[..., None], None, c.n_experts)
        if c.shared_expert:
            out = out + self.shared_expert(x)
        return out, load_balancing_loss(logits, choice, valid), router_z_loss(logits, valid), shares

    def _capacity(self, x, top_idx, weights, valid):  # (B, T, C), (B, T, k) x2, (B, T) -> (B, T, C), (E + 1,)
        """Each sequence is a group with its own buffers: (B, E, capacity, C)."""
        c, (B, T, C) = self.cfg, x.shape
        cap = c.expert_capacity(T)
        plan = ops.dispatch(top_idx, weights, c.n_experts, cap)  # (B, T*k) each
        shares = routing_shares(plan.expert, torch.gather(valid, 1, plan.token), plan.slot < c.n_experts * cap,
                                c.n_experts)
        rows = torch.gather(x, 1, plan.token[..., None].expand(-1, -1, C))  # (B, T*k, C)
        buffers = x.new_zeros(B, c.n_experts * cap + 1, C).scatter(1, plan.slot[..., None].expand(-1, -1, C), rows)
        h = buffers[:, :-1].reshape(B, c.n_experts, cap, C)  # the last row took the dropped
        y = torch.stack([expert(h[:, e]) for e, expert in enumerate(self.experts)], 1)  # (B, E, cap, C)
        y = torch.cat([y.reshape(B, -1, C), y.new_zeros(B, 1, C)], 1)
        y = torch.gather(y, 1, plan.slot[..., None].expand(-1, -1, C)) * plan.weight[..., None].to(y.dtype)
        return y.new_zeros(B, T, C).scatter_add(1, plan.token[..., None].expand(-1, -1, C), y), shares

    def _ragged(self, x, top_idx, weights):  # (B, T, C), (B, T, k) x2 -> (B, T, C)
        """The whole batch is one group, dropless: rows sorted by expert,
        through torch._grouped_mm where this torch has it (one kernel per
        projection), else each expert on its run of rows (torch.cat)."""
        c, (B, T, C) = self.cfg, x.shape
        N = B * T
        plan = ops.dispatch(top_idx.reshape(1, N, -1), weights.reshape(1, N, -1), c.n_experts, N)
        token, weight, expert = plan.token[0], plan.weight[0], plan.expert[0]
        rows = x.reshape(N, C)[token]  # (N*k, C) in expert order
        if GROUPED_MM:
            ends = plan.sizes[0].cumsum(0).to(torch.int32)
            y = self._experts(rows, lambda h, k: torch._grouped_mm(h, k.to(h.dtype), offs=ends),
                              lambda b: b[expert])
        else:
            sizes = plan.sizes[0].tolist()
            runs = zip(self.experts, sizes, itertools.accumulate(sizes))
            y = torch.cat([expert_mlp(rows[end - n:end]) for expert_mlp, n, end in runs])
        return y.new_zeros(N, C).index_add(0, token, y * weight[:, None].to(y.dtype)).reshape(B, T, C)

    def _experts(self, h, matmul, bias):
        """MLP's function with the experts' weights stacked: matmul(h, kernel
        (E, in, out)) and bias(b (E, out)) say how rows meet experts."""
        c = self.cfg

        def linear(name, h):
            layers = [getattr(e, name) for e in self.experts]
            out = matmul(h, torch.stack([layer.weight for layer in layers]).transpose(1, 2))
            return out + bias(torch.stack([layer.bias for layer in layers])).to(out.dtype) if c.mlp_bias else out

        if c.mlp == "swiglu":
            h = ops.activation("silu", linear("gate", h)) * linear("up", h)
        else:
            h = ops.activation(c.mlp, linear("up", h))
        return linear("down", ops.dropout(h, c.mlp_dropout, self.training))


GROUPED_MM = hasattr(torch, "_grouped_mm")  # torch >= 2.8: one grouped matmul over the sorted rows


def routing_shares(expert, valid, kept, n_experts: int):
    """Where the valid (token, choice) assignments went, as shares of them:
    (E + 1,), expert e's kept assignments at e, the dropped ones last (sums
    to 1). expert holds one entry per assignment, any shape; valid and kept
    (None: all) broadcast to it."""
    w = valid.expand(expert.shape).float()
    n = w.sum().clamp(min=1.0)
    held = w if kept is None else w * kept
    per_expert = w.new_zeros(n_experts).index_add(0, expert.reshape(-1), held.reshape(-1))
    return torch.cat([per_expert, (w - held).sum()[None]]) / n


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
