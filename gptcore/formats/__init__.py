"""Checkpoint formats, framework-free (numpy only).

Every reader returns a `Checkpoint`: a `ModelConfig`, the weights under our
torch-style names (the torchgpt state_dict keys, which gptcore.weights also
gives the jaxgpt params) and the tokenizer.json that travels with them. Every
writer takes one. Foreign names are reached through the key maps of
`keymap.py`, one table per format.

Modules: keymap (the mapping machinery), state (our names and shapes for a
config), safetensors_io (lazy reader, streaming writer), hf and hf_config
(Hugging Face GPT-2 / Llama / Mixtral directories and configs), nanogpt
(nanoGPT ckpt.pt import), torch_pt (.pt files; imports torch lazily, so
reading or writing .pt needs torch installed), convert (the converter and its
command line, `python -m jaxgpt.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from gptcore.config import ModelConfig
from gptcore.errors import UserError


class FormatError(UserError):
    """A checkpoint that cannot be read, written or expressed; one line naming the key or field."""


@dataclass
class Checkpoint:
    cfg: ModelConfig
    tensors: Mapping[str, np.ndarray]  # our torch-style names; may load lazily, one tensor per access
    tokenizer: Path | None = None  # a tokenizer.json to copy along
    # the Hugging Face files it was imported from ({"config.json": {...}, "tokenizer_config.json": ...}):
    # an export to the same architecture keeps every field they hold
    hf_source: dict | None = None


def dtype_name(tensors: Mapping[str, np.ndarray]) -> str:
    """The floating dtype of the weights, as HF's config.json spells it ("float32", "bfloat16")."""
    first = tensors[next(iter(tensors))]
    return str(np.dtype(first.dtype).name)
