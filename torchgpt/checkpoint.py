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

from pathlib import Path

import safetensors.torch

from gptcore.config import ModelConfig
from gptcore.formats.convert import read_foreign
from gptcore.model_dir import (  # noqa: F401
    SAFETENSORS_FILE,
    CheckpointError,
    find_model_dir,
    read_model_config,
    tokenizer_path,
    write_model_dir,
)
from torchgpt.model import GPT, load_state_arrays


def save_model(directory: str | Path, model: GPT, cfg: ModelConfig, tokenizer_file: str | Path | None = None,
               *, overwrite: bool = False) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write_weights(tmp: Path) -> None:
        safetensors.torch.save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})

    return write_model_dir(directory, cfg, tokenizer_file, write_weights, overwrite=overwrite)


def load_model(directory: str | Path) -> tuple[ModelConfig, GPT, Path | None]:
    """(config, model in eval mode, tokenizer.json path or None) of a model
    directory, or of a training run directory holding one as model/."""
    directory = find_model_dir(directory, (SAFETENSORS_FILE,))
    if (foreign := read_foreign(directory)) is not None:  # a Hugging Face folder, a .pt or .safetensors file
        return foreign[0], load_state_arrays(foreign[1], foreign[0]), foreign[2]
    cfg = read_model_config(directory)
    if not (directory / SAFETENSORS_FILE).is_file():
        raise CheckpointError(f"{directory}: no {SAFETENSORS_FILE}")
    model = GPT(cfg)
    try:
        model.load_state_dict(safetensors.torch.load_file(directory / SAFETENSORS_FILE), strict=True)
    except Exception as e:  # safetensors / load_state_dict: truncated or foreign file
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{directory}: cannot load {SAFETENSORS_FILE} ({e.__class__.__name__}: {reason})") from None
    return cfg, model.eval(), tokenizer_path(directory)
