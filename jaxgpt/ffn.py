"""The feed-forward layers of a block in Flax linen: the MLP, and the
mixture of experts with its three dispatch implementations.

Parallel text: torchgpt/ffn.py. Shape legend as jaxgpt/model.py's; N
tokens of a group, R rows of an expert buffer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptcore.config import ModelConfig
from jaxgpt import ops
from jaxgpt.layers import dense
from jaxgpt.sharding import constrain


class MLP(nn.Module):
    """relu / gelu / gelu_tanh: down(act(up(x))); swiglu: down(silu(gate(x)) * up(x));
    mlp_dropout on the hidden activations before down."""
    cfg: ModelConfig
    dtype: Any = jnp.float32
    kernels: str = "auto"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):  # (..., C) -> (..., C)
        c = self.cfg

        def linear(fan_in, features, name, std=None):
            return dense(c, fan_in, features, c.mlp_bias, name, std, self.dtype, self.kernels)

        if c.mlp == "swiglu":
            h = ops.activation("silu", linear(c.d_model, c.d_ff, "gate")(x)) * linear(c.d_model, c.d_ff, "up")(x)
        else:
            h = ops.activation(c.mlp, linear(c.d_model, c.d_ff, "up")(x))  # (..., F)
        h = constrain(h, "batch", "length", "act_mlp")
        rng = None if self.deterministic or c.mlp_dropout == 0.0 else self.make_rng("dropout")
        return linear(c.d_ff, c.d_model, "down", c.residual_init_std)(ops.dropout(h, c.mlp_dropout, rng))


class MoE(nn.Module):
    """Top-k mixture of experts with an optional shared expert.

    The router runs in float32 (see ops.route). cfg.moe_impl says how tokens
    reach their experts; the parameters are the same (experts: one MLP
    vmapped over E, each weight with a leading E axis):
    - "dense": every expert on every token, outputs combined with the
      (mostly zero) routing weights: the reference the others are tested
      against, and what XLA:CPU runs fastest for a few small experts;
    - "capacity": the assignments sorted by expert (ops.dispatch) into
      (E, capacity, C) buffers, one batched matmul per projection, outputs
      scattered back by weight; assignments past an expert's capacity are
      dropped (a token dropped everywhere keeps its residual);
    - "ragged": dropless, the sorted rows through jax.lax.ragged_dot (the
      GPU / TPU path), then back in token order.
    """
    cfg: ModelConfig
    dtype: Any = jnp.float32
    kernels: str = "auto"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, valid):  # (B, T, C), (B, T) -> (B, T, C), (), (), (E + 1,)
        """The layer's output, its load-balancing and router z-losses, and
        where the valid (token, choice) assignments went (routing_shares)."""
        c = self.cfg
        router = dense(c, c.d_model, c.n_experts, c.router_bias, "router", kernels="reference")  # float32
        logits = router(x.astype(jnp.float32))  # (B, T, E)
        weights, top_idx = ops.route(logits, c.top_k)  # (B, T, k) each
        choice = jax.nn.one_hot(top_idx, c.n_experts, dtype=jnp.float32)  # (B, T, k, E)
        experts = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          in_axes=None, out_axes=0, axis_size=c.n_experts)(
            c, self.dtype, self.kernels, self.deterministic, name="experts")
        if self.is_initializing() and c.moe_impl != "dense":
            experts(x[:1, :1])  # the parameters are the dense path's
        if c.moe_impl == "dense":
            combine = jnp.einsum("BTk,BTkE->BTE", weights, choice)  # (B, T, E)
            expert_out = experts(x)  # (E, B, T, C)
            out = jnp.einsum("BTE,EBTC->BTC", combine.astype(expert_out.dtype), expert_out)
        elif c.moe_impl == "capacity":
            out, shares = self._capacity(experts.variables["params"], x, top_idx, weights, valid)
        else:
            out = self._ragged(experts.variables["params"], x, top_idx, weights)
        if c.moe_impl != "capacity":  # dropless: every assignment kept
            shares = routing_shares(top_idx, valid[..., None], None, c.n_experts)
        if c.shared_expert:
            out = out + MLP(c, self.dtype, self.kernels, self.deterministic, name="shared_expert")(x)
        return out, load_balancing_loss(logits, choice, valid), router_z_loss(logits, valid), shares

    def _capacity(self, w, x, top_idx, weights, valid):  # (B, T, C), (B, T, k) x2, (B, T) -> (B, T, C), (E + 1,)
        """Each sequence is a group with its own buffers (its rows stay on the
        devices that hold it): (B, E, capacity, C)."""
        c, (B, T, C) = self.cfg, x.shape
        cap = c.expert_capacity(T)
        plan = ops.dispatch(top_idx, weights, c.n_experts, cap)  # (B, T*k) each
        shares = routing_shares(plan.expert, jnp.take_along_axis(valid, plan.token, 1),
                                plan.slot < c.n_experts * cap, c.n_experts)
        rows = jnp.take_along_axis(x, plan.token[..., None], 1)  # (B, T*k, C)
        buffers = jax.vmap(lambda r, s: jnp.zeros((c.n_experts * cap + 1, C), x.dtype).at[s].set(r))(
            rows, plan.slot)  # (B, E*cap + 1, C): the last row takes the dropped
        # experts over the "expert" devices (from rows over them): an all-to-all on a mesh with one
        h = constrain(buffers[:, :-1].reshape(B, c.n_experts, cap, C), "expert_batch", "act_experts", None, None)
        y = self._experts(w, h, lambda h, k: jnp.einsum("BERC,ECF->BERF", h, k), lambda b: b[None, :, None, :])
        y = constrain(y, "expert_batch", "act_experts", None, None)
        y = jnp.concatenate([y.reshape(B, -1, C), jnp.zeros((B, 1, C), y.dtype)], 1)
        y = jnp.take_along_axis(y, plan.slot[..., None], 1) * plan.weight[..., None].astype(y.dtype)  # (B, T*k, C)
        return jax.vmap(lambda y, t: jnp.zeros((T, C), y.dtype).at[t].add(y))(y, plan.token), shares

    def _ragged(self, w, x, top_idx, weights):  # (B, T, C), (B, T, k) x2 -> (B, T, C)
        """The whole batch is one group, dropless: rows sorted by expert."""
        c, (B, T, C) = self.cfg, x.shape
        N = B * T
        plan = ops.dispatch(top_idx.reshape(1, N, -1), weights.reshape(1, N, -1), c.n_experts, N)
        token, weight, expert = plan.token[0], plan.weight[0], plan.expert[0]
        y = self._experts(w, x.reshape(N, C)[token], lambda h, k: jax.lax.ragged_dot(h, k, plan.sizes[0]),
                          lambda b: b[expert])  # (N*k, C) in expert order
        return jnp.zeros((N, C), y.dtype).at[token].add(y * weight[:, None].astype(y.dtype)).reshape(B, T, C)

    def _experts(self, w, h, matmul, bias):
        """MLP's function with the experts' stacked weights w: matmul(h,
        kernel (E, in, out)) and bias(b (E, out)) say how rows meet experts."""
        c = self.cfg

        def linear(name, h):
            out = matmul(h.astype(self.dtype), w[name]["kernel"].astype(self.dtype))
            return out + bias(w[name]["bias"]).astype(out.dtype) if c.mlp_bias else out

        if c.mlp == "swiglu":
            h = ops.activation("silu", linear("gate", h)) * linear("up", h)
        else:
            h = ops.activation(c.mlp, linear("up", h))
        rng = None if self.deterministic or c.mlp_dropout == 0.0 else self.make_rng("dropout")
        return linear("down", ops.dropout(h, c.mlp_dropout, rng))


def routing_shares(expert, valid, kept, n_experts: int):
    """Where the valid (token, choice) assignments went, as shares of them:
    (E + 1,), expert e's kept assignments at e, the dropped ones last (sums
    to 1). expert holds one entry per assignment, any shape; valid and kept
    (None: all) broadcast to it."""
    w = jnp.broadcast_to(valid, expert.shape).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    held = w if kept is None else w * kept
    per_expert = jnp.zeros(n_experts, jnp.float32).at[expert.reshape(-1)].add(held.reshape(-1))
    return jnp.concatenate([per_expert, (w - held).sum()[None]]) / n


def router_z_loss(logits, valid):
    """ST-MoE's router z-loss, the mean over valid tokens of
    logsumexp(router logits)^2: it keeps the router's logits small.
    (B, T, E), (B, T) -> ()."""
    w = valid.astype(jnp.float32)
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * w) / jnp.maximum(w.sum(), 1.0)


def load_balancing_loss(logits, choice, valid):
    """Switch / Mixtral auxiliary loss: E * sum_{k,e} f[k, e] * P[e], where
    f is the fraction of (valid) tokens whose k-th choice is expert e and P the
    mean router probability of e. (B, T, E), (B, T, k, E), (B, T) -> ()."""
    w = valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    f = jnp.einsum("BTkE,BT->kE", choice, w) / n  # (k, E)
    p = jnp.einsum("BTE,BT->E", jax.nn.softmax(logits, axis=-1), w) / n  # (E,)
    return logits.shape[-1] * jnp.sum(f * p[None, :])
