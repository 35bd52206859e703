"""Model directories for the torch twin.

Parallel text: jaxgpt/checkpoint.py, same directory layout:

    config.json        {"format": "jaxgpt", "model": {...ModelConfig fields...}}
    tokenizer.json     the HF `tokenizers` file the model was trained with (optional)
    model.safetensors  the state_dict (torchgpt names); jaxgpt writes it next to
                       its orbax params/, so both twins read every model directory

`save_model` writes into a temporary sibling and renames it into place, and
refuses to replace an existing directory unless told to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch

from gptcore.config import ConfigError, ModelConfig
from torchgpt.model import GPT

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message says why."""


def save_model(directory: str | Path, model: GPT, cfg: ModelConfig, tokenizer_file: str | Path | None = None,
               *, overwrite: bool = False) -> Path:
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists (refusing to overwrite it)")
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps({"format": "jaxgpt", "model": cfg.to_dict()}, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
        return ModelConfig.from_dict(meta["model"])
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a jaxgpt model directory)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e.__class__.__name__}: {e})") from None


def load_model(directory: str | Path) -> tuple[ModelConfig, GPT, Path | None]:
    """(config, model in eval mode, tokenizer.json path or None) of a model directory."""
    directory = Path(directory).absolute()
    cfg = read_model_config(directory)
    if not (directory / SAFETENSORS_FILE).is_file():
        raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE}")
    model = GPT(cfg)
    try:
        model.load_state_dict(safetensors.torch.load_file(directory / SAFETENSORS_FILE), strict=True)
    except Exception as e:  # safetensors / load_state_dict: truncated or foreign file
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{directory}: cannot load {SAFETENSORS_FILE} ({e.__class__.__name__}: {reason})") from None
    tokenizer = directory / TOKENIZER_FILE
    return cfg, model.eval(), tokenizer if tokenizer.is_file() else None
