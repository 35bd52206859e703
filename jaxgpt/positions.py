"""Position encodings by name (ModelConfig.position), the jax twin.

Parallel text: torchgpt/positions.py. Each kind says what it adds to the
token embeddings (`embed`, called inside GPT, where a learned table becomes
the parameter `pos_emb`) and how it turns queries and keys (`rotate`, called
inside Attention on (B, T, N, D) heads). A new kind is one class here, one in
the twin, its name in gptcore.config.POSITIONS, and a parity test.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from gptcore.config import ModelConfig
from gptcore.rope import rope_frequencies
from jaxgpt import ops
from jaxgpt.layers import embedding_init

KINDS: dict[str, type[Positions]] = {}


def register(name: str):
    def add(kind):
        KINDS[name] = kind
        return kind
    return add


@register("none")
class Positions:
    """No position information besides the causal mask."""

    @staticmethod
    def embed(cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
        return x  # (B, T, C)

    @staticmethod
    def rotate(cfg: ModelConfig, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return q, k  # (B, T, H, D), (B, T, K, D)


@register("learned")
class Learned(Positions):
    """GPT-2's table of context_length learned vectors."""

    @staticmethod
    def embed(cfg, x, positions):
        table = nn.Embed(cfg.context_length, cfg.d_model, name="pos_emb", embedding_init=embedding_init(cfg))
        return x + table(positions)  # (B, T, C)


@register("sinusoidal")
class Sinusoidal(Positions):
    """Vaswani et al.'s fixed sin / cos table."""

    @staticmethod
    def embed(cfg, x, positions):
        return x + ops.sinusoidal_positions(positions, cfg.d_model)  # (B, T, C)


@register("rope")
class Rotary(Positions):
    """Rotary positions (rotate-half), at gptcore.rope's frequencies (base and scaling)."""

    @staticmethod
    def rotate(cfg, q, k, positions):
        inv_freq = rope_frequencies(cfg)  # (D/2,)
        return ops.apply_rope(q, positions, inv_freq), ops.apply_rope(k, positions, inv_freq)
