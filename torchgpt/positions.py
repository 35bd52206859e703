"""Position encodings by name (ModelConfig.position), the torch twin.

Parallel text: jaxgpt/positions.py. Each kind is a module GPT holds as
`pos_emb`: its forward adds to the token embeddings (a learned table is its
`weight`, so the state_dict key is pos_emb.weight), and `rotate` turns
queries and keys inside Attention on (B, T, N, D) heads. A new kind is one
class here, one in the twin, its name in gptcore.config.POSITIONS, and a
parity test.
"""

from __future__ import annotations

import torch
from torch import nn

from gptcore.config import ModelConfig
from gptcore.rope import rope_frequencies
from torchgpt import ops

KINDS: dict[str, type[nn.Module]] = {}


def register(name: str):
    def add(kind):
        KINDS[name] = kind
        return kind
    return add


@register("none")
class Positions(nn.Module):
    """No position information besides the causal mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x  # (B, T, C)

    @staticmethod
    def rotate(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k  # (B, T, H, D), (B, T, K, D)


@register("learned")
class Learned(nn.Embedding):
    """GPT-2's table of context_length learned vectors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.context_length, cfg.d_model)

    def forward(self, x, positions):
        return x + super().forward(positions)  # (B, T, C)

    rotate = Positions.rotate


@register("sinusoidal")
class Sinusoidal(Positions):
    """Vaswani et al.'s fixed sin / cos table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.dim = cfg.d_model

    def forward(self, x, positions):
        return x + ops.sinusoidal_positions(positions, self.dim)  # (B, T, C)


@register("rope")
class Rotary(Positions):
    """Rotary positions (rotate-half), at gptcore.rope's frequencies (base and scaling)."""

    @staticmethod
    def rotate(cfg, q, k, positions):
        inv_freq = rope_frequencies(cfg)  # (D/2,)
        return ops.apply_rope(q, positions, inv_freq), ops.apply_rope(k, positions, inv_freq)
