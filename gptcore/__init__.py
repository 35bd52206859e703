"""Framework-free parts shared by jaxgpt and torchgpt: config, presets, data."""

from gptcore.config import ConfigError, ModelConfig
from gptcore.presets import load_config, load_model_config, preset_names

__all__ = ["ConfigError", "ModelConfig", "load_config", "load_model_config", "preset_names"]
