"""The optimizer of torchgpt.train: AdamW on nanoGPT's decay mask (two param
groups), the learning rate of gptcore.train_config.lr_at set before each
step, and torch's own clip_grad_norm_ (in torchgpt.step).

Parallel text: jaxgpt/optim.py.
"""

from __future__ import annotations

import torch

from gptcore.train_config import TrainConfig, lr_at


def decay_names(model: torch.nn.Module, decay: str = "matrices") -> set[str]:
    """Names of the parameters weight decay applies to. "matrices" is
    nanoGPT's rule: every parameter with ndim >= 2 (Linear and Embedding
    weights); biases and norm gains do not decay."""
    return {n for n, p in model.named_parameters() if decay == "all" or (decay == "matrices" and p.dim() >= 2)}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with every hyperparameter explicit (torch's weight_decay default
    is 1e-2, optax's 1e-4) and two param groups for the decay mask."""
    decayed = decay_names(model, cfg.decay)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             amsgrad=False, foreach=False, fused=False)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """lr_at(step) into every param group; returns it."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
