"""Convert checkpoints between formats.

    python -m jaxgpt.convert SRC DST [--from FORMAT] [--to FORMAT] [--arch ARCH] [--force]

Formats (inferred from the paths unless given):
    jaxgpt       a model directory of either twin (config.json + model.safetensors
                 + tokenizer.json; jax's also holds params/), or a run directory
    pt           a torchgpt file: torch.save({"config": {...}, "model": state_dict})
    safetensors  our weight names; the config as JSON in the metadata ("config"),
                 or a config.json beside the file
    hf           a Hugging Face directory: GPT-2, Llama or Mixtral (--arch; by
                 default Mixtral for MoE, GPT-2 for learned positions, else Llama)
    nanogpt      a nanoGPT ckpt.pt (read only)

SRC: a directory is jaxgpt or hf by its config.json; *.safetensors is
safetensors; *.pt / *.pth / *.bin / *.ckpt is pt, or nanogpt when the file
holds "model_args". DST: *.safetensors, *.pt / *.pth, else a jaxgpt
directory; give --to hf (or --arch) for a Hugging Face directory.

.pt files are read with torch.load(weights_only=True) (needs torch
installed; torch is imported only then); nothing else imports a framework.
DST is written under a temporary name and renamed at the end, so a failure
leaves nothing behind; an existing DST is refused unless --force. Weights keep their dtype (bf16 stays bf16),
except in jaxgpt directories, which hold the model's float32 parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from gptcore.cli import Parser, guarded
from gptcore.config import ConfigError, ModelConfig
from gptcore.formats import Checkpoint, FormatError, hf, nanogpt, safetensors_io
from gptcore.formats.nanogpt_meta import find_meta, read_meta
from gptcore.formats.state import InOrder, check_state
from gptcore.model_dir import (
    MODEL_WEIGHTS,
    SAFETENSORS_FILE,
    CheckpointError,
    find_model_dir,
    read_hf_source,
    read_model_config,
    tokenizer_path,
    with_user_permissions,
    write_model_dir,
)
from gptcore.tokenizer import Tokenizer

FORMATS = ("jaxgpt", "pt", "safetensors", "hf", "nanogpt")
READ_ONLY = ("nanogpt",)
_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# -- readers ---------------------------------------------------------------------

def read_jaxgpt(path: Path) -> Checkpoint:
    """A model directory (or a run directory's model/) by its model.safetensors,
    which both twins write: no framework is needed to read it."""
    try:
        directory = find_model_dir(path, MODEL_WEIGHTS)
        cfg = read_model_config(directory)
    except CheckpointError as e:
        raise FormatError(str(e)) from None
    if not (directory / SAFETENSORS_FILE).is_file():
        raise FormatError(f"{directory}: no {SAFETENSORS_FILE}")
    tensors = safetensors_io.SafetensorsFile(directory / SAFETENSORS_FILE)
    check_state({k: tensors.shape(k) for k in tensors}, cfg, str(directory))
    return Checkpoint(cfg, InOrder(tensors, cfg), tokenizer_path(directory), read_hf_source(directory))


def read_pt(path: Path) -> Checkpoint:
    from gptcore.formats import torch_pt
    obj = torch_pt.load(path)
    if isinstance(obj, dict) and "model_args" in obj:
        return _with_meta(nanogpt.read(obj, path), obj, path)
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict) or not isinstance(obj.get("model"), dict):
        raise FormatError(f"{path}: not a torchgpt checkpoint (expected a dict with 'config' and 'model')")
    cfg = _config(obj["config"], path)
    check_state({k: np.shape(v) for k, v in obj["model"].items()}, cfg, str(path))
    return Checkpoint(cfg, InOrder(obj["model"], cfg), _embedded_tokenizer(obj.get("tokenizer"), path))


def read_nanogpt(path: Path) -> Checkpoint:
    from gptcore.formats import torch_pt
    obj = torch_pt.load(path)
    return _with_meta(nanogpt.read(obj, path), obj, path)


def _with_meta(ckpt: Checkpoint, obj: dict, path: Path) -> Checkpoint:
    """A nanoGPT checkpoint with its dataset's character vocabulary (meta.pkl),
    when there is one, as tokenizer.json: the converted model can generate."""
    meta = find_meta(obj, path)
    if meta is None:
        return ckpt
    tokenizer = read_meta(meta)
    if tokenizer.vocab_size > ckpt.cfg.vocab_size:
        raise FormatError(f"{meta}: {tokenizer.vocab_size} characters, the checkpoint's vocab_size is "
                          f"{ckpt.cfg.vocab_size}")
    return dataclasses.replace(ckpt, tokenizer=tokenizer.save(_scratch() / "tokenizer.json"))


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def _scratch() -> Path:
    """A temporary directory removed at exit, after the writer has copied what it holds."""
    scratch = tempfile.TemporaryDirectory(prefix="jaxgpt-convert-")
    _SCRATCH.append(scratch)
    return Path(scratch.name)


def _embedded_tokenizer(text, where) -> Path | None:
    """The tokenizer.json text a .pt or safetensors file carries, as a file
    (checked to parse); None when it carries none."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise FormatError(f"{where}: its tokenizer is a {type(text).__name__}, not tokenizer.json text")
    path = _scratch() / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    Tokenizer.load(path)  # parses, or one line naming why not
    return path


def _tokenizer_text(ckpt: Checkpoint) -> dict[str, str]:
    """{"tokenizer": its tokenizer.json text} for a file format to carry, {} when it has none."""
    return {} if ckpt.tokenizer is None else {"tokenizer": Path(ckpt.tokenizer).read_text(encoding="utf-8")}


def read_safetensors(path: Path) -> Checkpoint:
    tensors = safetensors_io.SafetensorsFile(path)
    if "config" in tensors.metadata:
        try:
            meta = json.loads(tensors.metadata["config"])
        except json.JSONDecodeError:
            raise FormatError(f"{path}: the metadata's config is not JSON") from None
    elif (path.parent / "config.json").is_file():
        try:
            meta = json.loads((path.parent / "config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{path.parent / 'config.json'}: not JSON") from None
    else:
        raise FormatError(f"{path}: no config in the metadata and no config.json beside it")
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the config is not a JSON object")
    cfg = _config(meta.get("model", meta) if meta.get("format") == "jaxgpt" else meta, path)
    check_state({k: tensors.shape(k) for k in tensors}, cfg, str(path))
    return Checkpoint(cfg, InOrder(tensors, cfg), _embedded_tokenizer(tensors.metadata.get("tokenizer"), path))


def _config(d: dict, where) -> ModelConfig:
    try:
        return ModelConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{where}: bad model config ({e})") from None


# -- writers ---------------------------------------------------------------------

def write_jaxgpt(path: Path, ckpt: Checkpoint, arch=None) -> None:
    """A model directory both twins load: config.json, tokenizer.json and
    model.safetensors in the model's float32 (jaxgpt.checkpoint.save_model
    adds its orbax params/ when jax writes one)."""
    def write_weights(tmp: Path) -> None:
        tensors = ((k, np.asarray(v, np.float32)) for k, v in ckpt.tensors.items())
        safetensors_io.write(tmp / SAFETENSORS_FILE, tensors, {"format": "pt"})
    try:
        write_model_dir(path, ckpt.cfg, ckpt.tokenizer, write_weights, hf_source=ckpt.hf_source)
    except CheckpointError as e:
        raise FormatError(str(e)) from None


def write_pt(path: Path, ckpt: Checkpoint, arch=None) -> None:
    from gptcore.formats import torch_pt
    torch_pt.save(path, {"config": ckpt.cfg.to_dict(), **_tokenizer_text(ckpt)}, ckpt.tensors.items())


def write_safetensors(path: Path, ckpt: Checkpoint, arch=None) -> None:
    meta = {"format": "pt", "config": json.dumps(ckpt.cfg.to_dict()), **_tokenizer_text(ckpt)}
    safetensors_io.write(path, ckpt.tensors.items(), meta)


def write_hf(path: Path, ckpt: Checkpoint, arch=None, max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> None:
    hf.write(path, ckpt, arch, max_shard_bytes)


READERS = {"jaxgpt": read_jaxgpt, "pt": read_pt, "safetensors": read_safetensors, "hf": hf.read,
           "nanogpt": read_nanogpt}
WRITERS = {"jaxgpt": write_jaxgpt, "pt": write_pt, "safetensors": write_safetensors, "hf": write_hf}


def read_foreign(path: Path):
    """(config, {our name: array}, tokenizer.json or None) of a model in
    another format, converted in memory: a Hugging Face model directory
    (config.json with a model_type) or a .pt / .safetensors / nanoGPT file;
    None for a jaxgpt model directory. The generate CLIs of both twins take
    these as they are."""
    path = hf_cache_snapshot(path)
    if path.is_file():
        ckpt = READERS[source_format(path)](path)
    else:
        try:
            meta = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or "model_type" not in meta or "model" in meta:
            return None
        ckpt = hf.read(path)
    return ckpt.cfg, {name: ckpt.tensors[name] for name in ckpt.tensors}, ckpt.tokenizer


# -- conversion --------------------------------------------------------------------

def hf_cache_snapshot(path: Path) -> Path:
    """A Hugging Face cache root models--ORG--NAME as its snapshot (the one
    refs/main names, else the only one); any other path as it is."""
    if not (path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir()):
        return path
    ref = path / "refs" / "main"
    if ref.is_file() and (path / "snapshots" / ref.read_text().strip()).is_dir():
        return path / "snapshots" / ref.read_text().strip()
    snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) != 1:
        raise FormatError(f"{path}: {len(snapshots)} snapshots and no refs/main naming one: pass the snapshot "
                          f"directory itself")
    return snapshots[0]


def source_format(path: Path) -> str:
    if path.is_dir():
        if (path / "model" / "config.json").is_file():
            return "jaxgpt"  # a training run directory: read_jaxgpt reads its model/
        try:
            meta = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise FormatError(f"{path}: a directory without a readable config.json") from None
        if not isinstance(meta, dict):
            raise FormatError(f"{path}: config.json is not a JSON object")
        if meta.get("format") == "jaxgpt":
            return "jaxgpt"
        if "model_type" in meta:
            return "hf"
        raise FormatError(f"{path}: config.json is neither jaxgpt's nor Hugging Face's (use --from)")
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in _PT_SUFFIXES:
        return "pt"
    raise FormatError(f"{path}: cannot tell its format from the name (use --from)")


def target_format(path: Path, arch: str | None) -> str:
    if arch is not None:
        return "hf"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".pt", ".pth"):
        return "pt"
    return "jaxgpt"


def convert(src: str | Path, dst: str | Path, src_format: str | None = None, dst_format: str | None = None,
            arch: str | None = None, force: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Read SRC, write DST under a temporary name of its own, rename it into
    place. With force, an existing DST is replaced only when it is a previous
    conversion's output (check_replaceable)."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not src.exists():
        raise FormatError(f"{src} does not exist")
    src = hf_cache_snapshot(src)
    if dst == src:
        raise FormatError(f"{dst}: the destination is the source")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FormatError(f"{dst} already exists (use --force to replace it)")
        check_replaceable(dst, src)
    if any(p.exists() and not p.is_dir() for p in dst.parents):
        raise FormatError(f"Not a directory: {next(p for p in dst.parents if p.exists() and not p.is_dir())}")
    src_format = src_format or source_format(src)
    dst_format = dst_format or target_format(dst, arch)
    if dst_format in READ_ONLY:
        raise FormatError(f"{dst_format} is a source format only")
    if arch is not None and dst_format != "hf":
        raise FormatError(f"--arch applies to --to hf only, not {dst_format}")
    if max_shard_bytes is not None and dst_format != "hf":
        raise FormatError(f"--max-shard-size applies to --to hf only, not {dst_format}")
    extra = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    ckpt = READERS[src_format](src)
    dst.parent.mkdir(parents=True, exist_ok=True)  # a new folder for a file destination
    # a name no other conversion (or file of the user's) has: mkdtemp creates it, we write inside it
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".converting", dir=dst.parent))
    tmp = scratch / dst.name
    try:
        WRITERS[dst_format](tmp, ckpt, arch, **extra)
        with_user_permissions(tmp)
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


# what a conversion writes into a model directory: --force replaces a directory holding only these
MODEL_DIR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "model.safetensors", "model.safetensors.index.json", "params")


def check_replaceable(dst: Path, src: Path) -> None:
    """--force replaces a previous conversion's output and nothing else: a
    model file (.pt / .safetensors) or a model directory holding only what
    conversions write, never the source or a directory around it."""
    if dst.is_symlink():
        raise FormatError(f"{dst} is a link: refusing to replace it (remove it yourself)")
    if src == dst or src.is_relative_to(dst):
        raise FormatError(f"{dst} is or contains the source {src}: refusing to replace it")
    if dst.is_file():
        if dst.suffix not in (".safetensors", *_PT_SUFFIXES):
            raise FormatError(f"{dst} is not a model file (.pt, .safetensors): refusing to replace it")
        return
    others = sorted(p.name for p in dst.iterdir()
                    if p.name not in MODEL_DIR_FILES and not re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name))
    if others:
        raise FormatError(f"{dst} holds files a conversion does not write ({', '.join(others[:5])}): refusing to "
                          f"replace it (choose a new destination)")


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '20KB' or bytes -> bytes (save_pretrained's spellings)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise FormatError(f"--max-shard-size: {text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "B").upper()])


# (src, dst, tolerance) -> a line saying what was compared; FormatError when they differ beyond it
Verifier = Callable[[Path, Path, float], str]


def main(argv=None, verify: Verifier | None = None) -> int:
    """The command line; `verify` (jaxgpt.convert passes its own, which needs
    a framework to run the models) serves --verify."""
    p = Parser(prog="python -m jaxgpt.convert", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="src_format", choices=FORMATS)
    p.add_argument("--to", dest="dst_format", choices=[f for f in FORMATS if f not in READ_ONLY])
    p.add_argument("--arch", choices=hf.ARCHS, help="Hugging Face architecture of an hf export")
    p.add_argument("--force", action="store_true", help="replace an existing DST (a previous conversion's output)")
    p.add_argument("--max-shard-size", help="hf export: shard the weights above this size (default 5GB)")
    p.add_argument("--verify", action="store_true",
                   help="after converting, run both sides on fixed token sequences; exit 2 if their logits differ")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--verify: largest |logit difference| accepted")
    args = p.parse_args(argv)

    def body():
        if args.verify and verify is None:
            raise FormatError("--verify needs a framework to run the models: use python -m jaxgpt.convert")
        shard = None if args.max_shard_size is None else parse_size(args.max_shard_size)
        dst = convert(args.src, args.dst, args.src_format, args.dst_format, args.arch, args.force, shard)
        print(f"wrote {dst}")
        if args.verify:
            print(verify(hf_cache_snapshot(Path(args.src).absolute()), dst, args.tolerance))
    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
