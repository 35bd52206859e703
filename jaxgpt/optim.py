"""The optimizer of jaxgpt.train: clipping, then AdamW on nanoGPT's decay
mask, with the learning rate of gptcore.train_config.lr_at.

Parallel text: torchgpt/optim.py (the same mask as two param groups,
torch's clip_grad_norm_, torch.optim.AdamW, the same lr_at).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptcore.train_config import TrainConfig, lr_at


def decay_mask(params, decay: str = "matrices"):
    """True where weight decay applies. "matrices" is nanoGPT's rule (every
    tensor with ndim >= 2 in the torch layout): Dense kernels and embeddings
    decay; biases, norm gains and the lm_head bias do not. Named by leaf, not
    by ndim, because stacked layers (scan) and experts (vmap) add an axis."""
    def leaf_decays(path, _):
        return decay == "all" or (decay == "matrices" and path[-1].key in ("kernel", "embedding"))
    return jax.tree_util.tree_map_with_path(leaf_decays, params)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: grads * min(1, max_norm / (norm + 1e-6)).
    (optax.clip_by_global_norm has no epsilon and skips the multiply when
    norm <= max_norm.)"""
    def update_fn(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr_at as a function of the update count (optax passes 0 to the first
    update, as lr_at expects): lr_at's values at steps 0 .. decay_steps,
    looked up, and min_lr after. One formula for both twins, so the jax step
    cannot drift from the torch one (or from nanoGPT's get_lr)."""
    last = max(cfg.decay_steps, cfg.warmup_steps)  # lr_at is min_lr from here on
    return _schedule(tuple(lr_at(step, cfg) for step in range(last + 1)))


@functools.lru_cache  # equal schedules share one function, hence one optimizer and one compiled step
def _schedule(values: tuple[float, ...]) -> optax.Schedule:
    table = np.asarray(values, np.float32)  # (decay_steps + 1,)

    def schedule(count):
        return jnp.asarray(table)[jnp.clip(count, 0, len(table) - 1)]
    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW with every hyperparameter explicit (optax's
    weight_decay default is 1e-4, torch's 1e-2)."""
    return _optimizer(lr_schedule(cfg), cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay, cfg.decay,
                      cfg.grad_clip)


@functools.lru_cache
def _optimizer(schedule, b1, b2, eps, weight_decay, decay, grad_clip) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=weight_decay,
                        mask=functools.partial(decay_mask, decay=decay))
    if grad_clip > 0:
        return optax.chain(clip_grad_norm(grad_clip), adamw)
    return adamw
