"""Model directories: the config travels with the weights.

A model directory holds

    config.json      {"format": "jaxgpt", "model": {...ModelConfig fields...}}
    tokenizer.json   the HF `tokenizers` file the model was trained with (optional)
    params/          the parameter tree, saved by orbax's StandardCheckpointer
    model.safetensors  the same weights with torchgpt's state_dict names, so
                     torchgpt (which never imports jax) reads every model
                     directory; a directory with only this file loads here too

`save_model` writes into a temporary sibling and renames it into place, so a
crash never leaves a half-written directory under the final name, and it
refuses to replace an existing directory unless told to.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

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
from jaxgpt.model import (
    load_state_arrays,
    param_shapes,
    stack_layers,
    state_arrays,
    unstack_layers,
)

PARAMS_DIR = "params"


def save_model(directory: str | Path, params, cfg: ModelConfig, tokenizer_file: str | Path | None = None,
               *, overwrite: bool = False) -> Path:
    params = jax.device_get(unstack_layers(params))

    def write_weights(tmp: Path) -> None:
        with _this_process_checkpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        safetensors.numpy.save_file(state_arrays(params), tmp / SAFETENSORS_FILE, metadata={"format": "pt"})

    return write_model_dir(directory, cfg, tokenizer_file, write_weights, overwrite=overwrite)


def load_model(directory: str | Path, *, scan_layers: bool = False) -> tuple[ModelConfig, dict, Path | None]:
    """(config, params, tokenizer.json path or None) of a model directory,
    or of a training run directory holding one as model/.

    Params are stored unrolled (blocks_0, blocks_1, ...); scan_layers=True
    stacks them for a scanned model.
    """

    directory = find_model_dir(directory, (PARAMS_DIR, SAFETENSORS_FILE))
    if (foreign := read_foreign(directory)) is not None:  # a Hugging Face folder, a .pt or .safetensors file
        cfg, tensors, tokenizer = foreign
        return cfg, _stacked(load_state_arrays(tensors, cfg), cfg, scan_layers), tokenizer
    cfg = read_model_config(directory)
    target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(cfg))
    if not (directory / PARAMS_DIR).is_dir() and (directory / SAFETENSORS_FILE).is_file():
        try:  # a directory written by torchgpt.checkpoint.save_model
            params = load_state_arrays(safetensors.numpy.load_file(directory / SAFETENSORS_FILE), cfg)
        except Exception as e:  # safetensors / WeightsError: truncated or foreign file
            raise CheckpointError(f"{directory}: cannot read {SAFETENSORS_FILE} ({e.__class__.__name__}: {e})") from None
        return cfg, _stacked(params, cfg, scan_layers), tokenizer_path(directory)
    if not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ directory")
    try:
        with _this_process_checkpointer() as ckptr:
            params = ckptr.restore(directory / PARAMS_DIR, target)
    except Exception as e:  # orbax raises many types for truncated / foreign files
        raise CheckpointError(f"{directory}: cannot restore params ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return cfg, _stacked(params, cfg, scan_layers), tokenizer_path(directory)


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """orbax for host arrays this process writes or reads alone: under
    jax.distributed the lead exports while the others do not, and a default
    checkpointer would wait for them at its barriers."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def _stacked(params, cfg: ModelConfig, scan_layers: bool):
    return stack_layers(params, cfg.n_layers) if scan_layers else params