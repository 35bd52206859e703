"""jaxgpt: a GPT-style decoder-only transformer in JAX / Flax linen."""

from gptcore.config import ModelConfig
from jaxgpt.model import GPT, ModelOutput, count_params, init_cache, init_params

__all__ = ["GPT", "ModelConfig", "ModelOutput", "count_params", "init_cache", "init_params"]
