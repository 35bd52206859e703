"""torchgpt: the PyTorch reference twin of jaxgpt, built from the same config."""

from gptcore.config import ModelConfig
from torchgpt.model import GPT, ModelOutput, count_params, init_cache

__all__ = ["GPT", "ModelConfig", "ModelOutput", "count_params", "init_cache"]
