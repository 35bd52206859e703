"""Rotary frequencies shared by both twins (numpy only), with the frequency
scalings of ModelConfig.rope_scaling by name. Both twins rotate by
`rope_frequencies(cfg)`, so a new scaling is one function here (registered in
SCALINGS and named in gptcore.config.ROPE_SCALINGS) and a parity test."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def rope_inv_freq(dim: int, base: float) -> np.ndarray:
    """(dim/2,) frequencies base^(-2i/dim), computed in float64 once so both
    twins start from the same float32 values."""
    return _inv_freq64(dim, base).astype(np.float32)


def _inv_freq64(dim: int, base: float) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def llama3(inv_freq: np.ndarray, cfg) -> np.ndarray:
    """Llama 3.1's scaling: keep the high frequencies (wavelength below
    original_context / high_freq_factor), divide the low ones (wavelength
    above original_context / low_freq_factor) by the factor, and between the
    two interpolate linearly in original_context / wavelength."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = np.clip((cfg.rope_original_context / wavelength - low) / (high - low), 0.0, 1.0)  # 0: low, 1: high
    return (1.0 - smooth) * inv_freq / factor + smooth * inv_freq


SCALINGS: dict[str, Callable[[np.ndarray, object], np.ndarray]] = {"none": lambda inv_freq, cfg: inv_freq,
                                                                   "llama3": llama3}


def rope_frequencies(cfg) -> np.ndarray:
    """(head_dim/2,) float32 frequencies of a ModelConfig's rotary positions."""
    return SCALINGS[cfg.rope_scaling](_inv_freq64(cfg.head_dim, cfg.rope_base), cfg).astype(np.float32)
