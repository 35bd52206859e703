"""What a run costs before anything is built: the parameter count without a
loop over layers or experts, and the host memory the train state and the
data buffers need, checked against the machine (validation before
allocation: an impossible size is one line, not an allocator traceback or a
machine that swaps for minutes)."""

from __future__ import annotations

import os

from gptcore.config import ModelConfig
from gptcore.errors import RunError
from gptcore.formats.state import state_shapes
from gptcore.train_config import TrainConfig

STATE_BYTES_PER_PARAM = 16  # float32 params, gradients and AdamW's two moments
GB = 2 ** 30


def param_count(cfg: ModelConfig) -> int:
    """Exactly the models' parameter count, from the 1- and 2-layer (and 2-
    and 3-expert) configs: every layer and every expert has the same size."""
    def count(c: ModelConfig) -> int:
        return sum(_prod(shape) for shape in state_shapes(c).values())

    def by_experts(c: ModelConfig) -> int:
        if not c.is_moe or c.n_experts <= 3:
            return count(c)
        two, three = (count(c.replace(n_experts=e, top_k=min(c.top_k, 2))) for e in (2, 3))
        return two + (c.n_experts - 2) * (three - two)

    if cfg.n_layers <= 2:
        return by_experts(cfg)
    one, two = (by_experts(cfg.replace(n_layers=n)) for n in (1, 2))
    return one + (cfg.n_layers - 1) * (two - one)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def host_bytes(model: ModelConfig, train: TrainConfig) -> dict[str, int]:
    """The host memory a run holds at once, by part (a lower bound: no
    activations, which live on the accelerator when there is one)."""
    T = model.context_length
    return {"params, gradients and AdamW moments": STATE_BYTES_PER_PARAM * param_count(model),
            "a step's batch": 3 * 4 * train.grad_accum * train.batch_size * T,
            "the evaluation batches": 2 * 4 * train.eval_batches * train.batch_size * T}


def machine_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model: ModelConfig, train: TrainConfig, available: int | None = None) -> None:
    """RunError naming the estimate and the machine's memory when the run
    cannot fit, before anything is allocated."""
    parts = host_bytes(model, train)
    available = machine_bytes() if available is None else available
    if sum(parts.values()) > available:
        detail = ", ".join(f"{name} {size / GB:,.1f} GB" for name, size in parts.items() if size >= 0.05 * GB)
        raise RunError(f"the run needs at least {sum(parts.values()) / GB:,.1f} GB of memory ({detail}); this "
                       f"machine has {available / GB:,.1f} GB: choose a smaller model or batch")
