"""What jaxgpt's modules are built from: the kernel path (reference or
XLA:CPU fast paths), Dense layers initialised as the config says, and the
embedding init.

Parallel text: torchgpt/model.py's GPT._init_weights (torch modules carry
their own defaults; "normal" re-initialises them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptcore.config import ModelConfig
from gptcore.train_config import KERNELS
from jaxgpt import cpu_kernels, ops


def kernel_ops(kernels: str):
    """The module whose norm / attention / Dense the model computes with:
    jaxgpt.ops, the reference (autodiff, the parallel text of torchgpt.ops),
    or jaxgpt.cpu_kernels, the same functions made fast for XLA:CPU. "auto":
    the CPU kernels when JAX runs on the CPU, else the reference."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "auto":
        kernels = "cpu" if jax.default_backend() == "cpu" else "reference"
    return cpu_kernels if kernels == "cpu" else ops


def dense(cfg: ModelConfig, fan_in: int, features: int, bias: bool, name: str, std: float | None = None,
           dtype=jnp.float32, kernels: str = "auto") -> nn.Dense:
    """A Dense of fan_in -> features, initialised as cfg.init says (std: the
    scaled residual init's, for "normal")."""
    dense = getattr(kernel_ops(kernels), "Dense", nn.Dense)
    if cfg.init == "torch_default":  # nn.Linear: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias alike
        kernel_init = bias_init = _uniform(fan_in ** -0.5)
    else:
        kernel_init, bias_init = nn.initializers.normal(std or cfg.init_std), nn.initializers.zeros
    return dense(features, use_bias=bias, name=name, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def embedding_init(cfg: ModelConfig):
    """N(0, init_std), or nn.Embedding's N(0, 1) under init = "torch_default"."""
    return nn.initializers.normal(1.0 if cfg.init == "torch_default" else cfg.init_std)
