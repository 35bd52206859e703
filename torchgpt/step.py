"""One training step of torchgpt, the reference.

Parallel text: jaxgpt/step.py. One optimizer step:

    grads = sum over A micro-batches of d/dparams [ sum_valid nll / N_valid_total + coef * aux / A ]
    grads = grads * min(1, clip / (|grads| + 1e-6))          # clip_grad_norm_
    params = AdamW(lr_at(step), betas, eps, weight_decay on matrices only)(grads)

Shape legend: A micro-batches per step, B batch, T block size, V vocab.
"""

from __future__ import annotations

import numpy as np
import torch

from gptcore import train_config
from gptcore.train_config import TrainConfig
from torchgpt import ops
from torchgpt.model import GPT
from torchgpt.optim import set_lr


def loss_fn(model: GPT, x, y, valid, n_total, n_micro, loss_chunk: int = 0):
    """The micro-batch's share of the step's objective: its summed nll over
    the step's N valid positions (so A micro-batches add up to the big
    batch's mean) plus its share of the MoE load-balancing and router
    z-losses. A large vocabulary's loss is chunked (gptcore's loss_chunk rule)."""
    c = model.cfg
    chunk = train_config.loss_chunk(c.vocab_size, x.numel(), loss_chunk)
    out = model(x, valid=valid, head=not chunk)
    n = valid.sum().float()
    if chunk:
        nll_sum = ops.chunked_cross_entropy(out.hidden, *model.lm_head_weights(), y, valid, chunk) * n
    else:
        nll_sum = ops.cross_entropy(out.logits, y, valid) * n
    objective = nll_sum / n_total + (c.aux_loss_coef * out.aux_loss + c.router_z_loss * out.z_loss) / n_micro
    return objective, (nll_sum, torch.cat([out.aux_loss[None], out.routing]))


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch, step: int, cfg: TrainConfig) -> dict:
    """One optimizer step on `batch` (x, y, valid each (A, B, T)); gradients
    of the A micro-batches accumulate in .grad."""
    x, y, valid = batch  # (A, B, T) each
    n_micro = x.shape[0]
    n_total = valid.sum().float().clamp(min=1.0)
    lr = set_lr(optimizer, step, cfg)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    nll_sum, aux = 0.0, 0.0  # aux: load-balancing loss [, routing shares (E + 1)]
    for i in range(n_micro):
        objective, (nll_i, aux_i) = loss_fn(model, x[i], y[i], valid[i], n_total, n_micro, cfg.loss_chunk)
        objective.backward()
        nll_sum, aux = nll_sum + nll_i.detach(), aux + aux_i.detach() / n_micro
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the norm before clipping
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    optimizer.step()
    metrics = {"loss": float(nll_sum / n_total), "aux_loss": float(aux[0]), "grad_norm": float(grad_norm), "lr": lr}
    if model.cfg.is_moe:
        metrics |= {"expert_load": aux[1:-1].tolist(), "dropped": float(aux[-1])}
    return metrics


def eval_fn(model: GPT, x, y, loss_chunk: int = 0) -> torch.Tensor:
    """Mean next-token loss of one (B, T) batch (the model in eval mode); a
    large vocabulary's loss chunked as in training."""
    chunk = train_config.loss_chunk(model.cfg.vocab_size, x.numel(), loss_chunk)
    out = model(x, head=not chunk)
    if chunk:
        every = torch.ones(y.shape, dtype=torch.bool, device=y.device)
        return ops.chunked_cross_entropy(out.hidden, *model.lm_head_weights(), y, every, chunk)
    return ops.cross_entropy(out.logits, y)  # (B, T, V) -> ()


@torch.no_grad()
def evaluate(model: GPT, batches, device, loss_chunk: int = 0) -> float:
    """Mean loss over the fixed evaluation batches (x, y (B, T) numpy each), dropout off."""
    model.eval()
    return float(np.mean([float(eval_fn(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                                        loss_chunk)) for x, y in batches]))
