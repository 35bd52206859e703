"""Rotary frequencies shared by both twins (numpy only)."""

import numpy as np


def rope_inv_freq(dim: int, base: float) -> np.ndarray:
    """(dim/2,) frequencies base^(-2i/dim), computed in float64 once so both
    twins start from the same float32 values."""
    return (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
