"""One training step of jaxgpt, as pure functions of one state pytree.

Parallel text: torchgpt/step.py. One optimizer step:

    grads = sum over A micro-batches of d/dparams [ sum_valid nll / N_valid_total + (coef * aux + z_coef * z) / A ]
    grads = grads * min(1, clip / (|grads| + 1e-6))          # torch's clip_grad_norm_
    params = AdamW(lr_at(step), betas, eps, weight_decay on matrices only)(grads)

The whole mutable state of a run is one pytree (`TrainState`: step, params,
opt_state); batches and dropout keys are pure functions of (seed, step), so
a checkpoint of the state is all a run needs to continue bit-identically.

Shape legend: A micro-batches per step, B batch, T block size, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gptcore import train_config
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig
from jaxgpt import ops
from jaxgpt.model import GPT, init_params, lm_head_weights, stack_layers
from jaxgpt.optim import lr_schedule, make_optimizer

Batch = tuple[jax.Array, jax.Array, jax.Array]  # x, y int32 and valid bool, each (A, B, T)


class TrainState(struct.PyTreeNode):
    """Everything a training step changes. `model` and `tx` are static (part
    of the tree structure), so one jit of train_step serves every run that
    shares them."""
    step: jax.Array  # () int32, optimizer steps taken
    params: Any
    opt_state: Any
    model: GPT = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: optax.Schedule = struct.field(pytree_node=False)  # the lr of tx, for the metrics
    loss_chunk: int = struct.field(pytree_node=False, default=0)  # train.loss_chunk (see loss_fn)


def make_model(mc: ModelConfig, tc: TrainConfig) -> GPT:
    """The model as the run computes it: tc's compute dtype (params stay
    float32), layer scan, remat, attention and kernels. Scanned layers take
    stack_layers(params); checkpoints and model directories hold whichever
    layout the run trains in, save_model writes the unrolled one."""
    return GPT(mc, dtype=jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32, scan_layers=tc.scan_layers,
               remat=tc.remat, attention_impl=tc.attention_impl, kernels=tc.kernels)


def create_state(model: GPT, params, cfg: TrainConfig) -> TrainState:
    tx = make_optimizer(cfg)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model=model,
                      tx=tx, schedule=lr_schedule(cfg), loss_chunk=cfg.loss_chunk)


def fresh_state(model: GPT, mc: ModelConfig, cfg: TrainConfig) -> TrainState:
    """A new run's state: init_params(mc, cfg.seed) (the unrolled layers,
    stacked for scan_layers: the same initial weights either way) and a fresh
    optimizer. Traceable, so a runner can jit it with output shardings."""
    params = init_params(mc, cfg.seed)
    return create_state(model, stack_layers(params, mc.n_layers) if model.scan_layers else params, cfg)


def loss_fn(params, model: GPT, x, y, valid, rng, n_total, n_micro, loss_chunk: int = 0):
    """The micro-batch's share of the step's objective: its summed nll over
    the step's N valid positions (so A micro-batches add up to the big
    batch's mean) plus its share of the MoE load-balancing and router
    z-losses. A large vocabulary's loss is chunked (gptcore's loss_chunk rule)."""
    c = model.cfg
    chunk = train_config.loss_chunk(c.vocab_size, x.size, loss_chunk)
    out = model.apply({"params": params}, x, valid=valid, deterministic=False, rngs={"dropout": rng},
                      head=not chunk)
    n = valid.sum().astype(jnp.float32)
    if chunk:
        nll_sum = ops.chunked_cross_entropy(out.hidden, *lm_head_weights(params, c), y, valid, chunk) * n
    else:
        nll_sum = ops.cross_entropy(out.logits, y, valid) * n
    objective = nll_sum / n_total + (c.aux_loss_coef * out.aux_loss + c.router_z_loss * out.z_loss) / n_micro
    return objective, (nll_sum, jnp.concatenate([out.aux_loss[None], out.routing]))


def step_fn(state: TrainState, batch: Batch, rng: jax.Array, axis_name: str | tuple[str, ...] | None = None):
    """One optimizer step on `batch` (A micro-batches, gradients accumulated
    in float32). Under pmap or shard_map (`axis_name`) each device holds a
    slice of every micro-batch and draws its own dropout masks; gradients,
    nll and token counts are summed over devices."""
    x, y, valid = batch  # (A, B, T) each
    n_micro = x.shape[0]
    n_total = valid.sum().astype(jnp.float32)
    n_shards = 1
    if axis_name is not None:
        n_total = jax.lax.psum(n_total, axis_name)
        n_shards = jax.lax.psum(1, axis_name)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    n_total = jnp.maximum(n_total, 1.0)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(grads, inputs):
        i, xi, yi, vi = inputs
        (_, (nll_sum, aux)), g = grad_fn(state.params, state.model, xi, yi, vi, jax.random.fold_in(rng, i),
                                         n_total, n_micro * n_shards, state.loss_chunk)
        return jax.tree_util.tree_map(jnp.add, grads, g), (nll_sum, aux)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, (nll_sums, auxs) = jax.lax.scan(micro_step, zeros, (jnp.arange(n_micro), x, y, valid))
    nll_sum, aux = nll_sums.sum(), auxs.mean(0)  # aux: load-balancing loss [, routing shares (E + 1)]
    if axis_name is not None:
        grads, nll_sum, aux = psum_flat((grads, nll_sum, aux / n_shards), axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll_sum / n_total, "aux_loss": aux[0], "grad_norm": optax.tree.norm(grads),
               "lr": state.schedule(state.step)}
    if state.model.cfg.is_moe:
        metrics |= {"expert_load": aux[1:-1], "dropped": aux[-1]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def psum_flat(tree, axis_name: str | tuple[str, ...]):
    """psum of a pytree as one flat float32 vector: one collective instead of
    one per leaf (XLA's CPU all-reduce meets the other devices once per buffer)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis_name))


train_step = jax.jit(step_fn, donate_argnums=0)
train_step.__doc__ = "step_fn jitted, the state donated: (state, batch (A, B, T) x3, rng) -> (state, metrics)."


def eval_fn(params, model: GPT, x: jax.Array, y: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """Mean next-token loss of one (B, T) batch, dropout off; a large
    vocabulary's loss chunked as in training (the runners jit this: a mesh
    runner with the activations laid out as in its step)."""
    chunk = train_config.loss_chunk(model.cfg.vocab_size, x.size, loss_chunk)
    out = model.apply({"params": params}, x, head=not chunk)
    if chunk:
        every = jnp.ones(y.shape, bool)
        return ops.chunked_cross_entropy(out.hidden, *lm_head_weights(params, model.cfg), y, every, chunk)
    return ops.cross_entropy(out.logits, y)  # (B, T, V) -> ()


eval_loss = jax.jit(eval_fn, static_argnums=(1, 4))
eval_loss.__doc__ = "eval_fn jitted: (params, model, x, y (B, T), loss_chunk) -> ()."


def evaluate(loss, batches) -> float:
    """Mean of loss(x, y) over the fixed evaluation batches (x, y (B, T) numpy each)."""
    return float(np.mean([float(loss(x, y)) for x, y in batches]))


def step_key(seed: int, step: int) -> jax.Array:
    """The dropout key of optimizer step `step`: a function of (seed, step)
    only, so a resumed run draws the same dropout masks."""
    return _step_key(np.uint32(seed), np.uint32(step))


@jax.jit
def _step_key(seed, step):  # one dispatch per step instead of two eager ops
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)
