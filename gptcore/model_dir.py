"""Model directories, the framework-free part: layout, atomic writes, config.

    config.json        {"format": "jaxgpt", "model": {...ModelConfig fields...}}
    tokenizer.json     the HF `tokenizers` file the model was trained with (optional)
    model.safetensors  the weights under torchgpt's state_dict names (both twins read it)
    params/            jaxgpt's orbax copy of the same weights (jaxgpt only)

jaxgpt.checkpoint and torchgpt.checkpoint add the weights of their framework.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from gptcore.config import ConfigError, ModelConfig
from gptcore.errors import UserError
from gptcore.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"
RUN_MODEL_DIR = "model"  # the train CLIs export a run's model to OUT_DIR/model
MODEL_WEIGHTS = ("params", SAFETENSORS_FILE)  # what either twin writes into a model directory (jax: both)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message says why."""


def write_model_dir(directory: str | Path, cfg: ModelConfig, tokenizer_file: str | Path | None,
                    write_weights: Callable[[Path], None], *, overwrite: bool = False,
                    hf_source: dict | None = None) -> Path:
    """Write config, tokenizer and (via `write_weights(tmp_dir)`) weights into
    a temporary sibling, then rename it into place: a crash never leaves a
    half-written directory under the final name. An existing directory is
    replaced only with overwrite=True."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory} already exists (refusing to overwrite it)")
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"format": "jaxgpt", "model": cfg.to_dict(), **({"hf_source": hf_source} if hf_source else {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    write_weights(tmp)
    with_user_permissions(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def with_user_permissions(path: Path) -> None:
    """Give path (a file, or a directory and all inside it) the modes the
    user's umask gives new files and folders: some writers (safetensors)
    create files readable by their owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def find_model_dir(directory: str | Path, weights: tuple[str, ...]) -> Path:
    """`directory` as an absolute path, or its model/ when it is a training
    run directory (it holds none of `weights` itself)."""
    directory = Path(directory).absolute()
    if not any((directory / w).exists() for w in weights) and (directory / RUN_MODEL_DIR / CONFIG_FILE).is_file():
        return directory / RUN_MODEL_DIR
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or "model" not in meta:
            raise CheckpointError(f"{path}: not a jaxgpt model config (a JSON object with a 'model' section)")
        return ModelConfig.from_dict(meta["model"])
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a jaxgpt model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e.__class__.__name__}: {e})") from None


def read_hf_source(directory: Path) -> dict | None:
    """The Hugging Face files a model directory was converted from, kept in its config.json (or None)."""
    try:
        kept = json.loads((directory / CONFIG_FILE).read_text()).get("hf_source")
    except (OSError, ValueError, AttributeError):
        return None
    return kept if isinstance(kept, dict) else None


def tokenizer_path(directory: Path) -> Path | None:
    """directory's tokenizer.json, None when it has none; one that is not
    a regular file of the model directory (a link elsewhere: copying it would
    hand out any file the link names) or does not parse is an error."""
    path = directory / TOKENIZER_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    check_inside(path, directory)
    Tokenizer.load(path)  # parses, or a one-line TokenizerError
    return path


def check_inside(path: Path, directory: Path) -> None:
    """path is a regular file whose real location lies inside directory (or,
    for a Hugging Face cache snapshot models--ORG--NAME/snapshots/HASH/, in
    that model's blobs/, where the snapshot's links point)."""
    target, roots = path.resolve(), [directory.resolve()]
    if directory.absolute().parent.name == "snapshots":
        roots.append((directory.absolute().parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{path} links to {target}, outside the model directory (not read)")
    if not target.is_file():
        raise CheckpointError(f"{path} is not a regular file")


def load_with_tokenizer(load: Callable[[str], tuple], checkpoint: str) -> tuple[ModelConfig, object, Tokenizer]:
    """(config, model, tokenizer) of a model directory through a twin's
    `load(dir) -> (config, model, tokenizer.json path or None)`: the
    commands that turn text into ids (generate, eval) need its tokenizer,
    and one that fits the model's vocabulary."""
    cfg, model, tokenizer_path = load(checkpoint)
    if tokenizer_path is None:
        raise CheckpointError(f"{checkpoint}: the model directory has no tokenizer.json")
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    return cfg, model, tokenizer
