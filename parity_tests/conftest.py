"""Shared fixtures of the parity suite: twins with identical weights.

Strict tier: float32 on CPU with the highest matmul precision in both
frameworks (JAX could otherwise run fp32 matmuls as TF32 / bf16 passes on
accelerators, torch can enable TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgpt.model as jm
import torchgpt.model as tm
from gptcore.config import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_float32_matmul_precision("highest")

TOL = 1e-5  # max abs difference of fp32 logits (HF's PT<->Flax tolerance)
KERNELS = ("reference", "cpu")  # jaxgpt's two paths (jaxgpt.model.kernel_ops): both are held to torch


def small(cfg: ModelConfig, **changes) -> ModelConfig:
    """A preset scaled down in width and depth only, keeping its head layout
    (n_heads, n_kv_heads, head_dim ratio) and every architecture choice."""
    d_model = 64
    head_dim = max(2, (cfg.head_dim * d_model) // cfg.d_model)
    head_dim += head_dim % 2
    fields = dict(n_layers=min(cfg.n_layers, 2), d_model=d_model, head_dim=head_dim,
                  d_ff=128, vocab_size=min(cfg.vocab_size, 256), context_length=min(cfg.context_length, 64))
    fields.update(changes)
    return cfg.replace(**fields)


@functools.lru_cache(maxsize=None)
def _twins(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    tmodel = tm.GPT(cfg).eval()
    with torch.no_grad():
        # Weights of a trained model's scale (activations O(1)), not the 0.02
        # init: with tiny weights a wrong GELU or eps would hide below 1e-5.
        for name, p in tmodel.named_parameters():
            if "emb" in name:  # logits of a tied head stay O(1) as in trained models
                p.normal_(0.0, 0.25)
            elif p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)  # 1 / sqrt(fan_in)
            else:  # biases start at 0 and norm gains at 1: make them non-trivial
                p.add_(0.1 * torch.randn_like(p))
    params = jm.load_state_arrays(tm.state_arrays(tmodel), cfg)
    return tmodel, params


def twins(cfg: ModelConfig, seed: int = 0):
    """(torch model in eval mode, jax params) holding the same weights."""
    return _twins(cfg, seed)


def tokens_for(cfg: ModelConfig, batch: int = 2, length: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (batch, min(length, cfg.context_length))).astype(np.int32)


def jax_forward(cfg, params, tokens, kernels="auto", **kw):
    return jm.GPT(cfg, kernels=kernels).apply({"params": params}, jnp.asarray(tokens), **kw)


def torch_forward(tmodel, tokens, **kw):
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items()}
    with torch.no_grad():
        return tmodel(torch.as_tensor(np.asarray(tokens)).long(), **kw)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def logits_diff(cfg: ModelConfig, seed: int = 0, kernels: str = "auto", **kw) -> float:
    tmodel, params = twins(cfg, seed)
    tokens = tokens_for(cfg)
    return max_diff(jax_forward(cfg, params, tokens, kernels, **kw).logits, torch_forward(tmodel, tokens, **kw).logits)


@pytest.fixture(params=KERNELS)
def kernels(request) -> str:
    """Each test that takes it runs on both of jaxgpt's kernel paths."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
