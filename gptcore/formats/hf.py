"""Hugging Face model directories: GPT-2, Llama and Mixtral, both directions.

A directory holds config.json, model.safetensors (or a sharded index, or a
pytorch_model.bin, read with weights_only) and, optionally, tokenizer.json;
export adds tokenizer_config.json and generation_config.json naming the
tokenizer's bos / eos / pad tokens. Configs are translated field by field in
hf_config.py; a missing bias is exported as a zero bias (with_zero_biases).

Layouts: GPT-2's Conv1D stores weights (in, out), ours are torch Linear's
(out, in); its c_attn is fused [q | k | v] like our qkv_proj. HF Llama's RoPE
is rotate-half like ours, so q_proj / k_proj need no permutation. Mixtral's
router (softmax over all experts, top-k, renormalise) equals ours (softmax
over the top-k logits); Mixtral has no router bias and no shared expert.
transformers 5 holds Mixtral experts fused in memory (mlp.experts.gate_up_proj
(E, 2F, C), down_proj (E, C, F)) but save_pretrained writes the per-expert
block_sparse_moe.experts.{e}.w1/w2/w3 names; export writes those, import
reads either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from gptcore.errors import UserError
from gptcore.formats import Checkpoint, FormatError, dtype_name, safetensors_io
from gptcore.formats.hf_config import ARCHS, config_from_hf, config_to_hf, default_arch  # noqa: F401
from gptcore.formats.keymap import (
    FUSE_QKV,
    QKV_BIASES,
    QKV_WEIGHTS,
    SPLIT_QKV,
    STACK_EXPERTS,
    STACK_GATE_UP,
    TRANSPOSE,
    KeyMap,
    chain,
    from_foreign,
    to_foreign,
)
from gptcore.formats.state import check_layer_count, state_shapes
from gptcore.model_dir import check_inside, tokenizer_path
from gptcore.tokenizer import Tokenizer

GPT2 = KeyMap("HF GPT-2", {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "blocks.{}.norm1.weight": "transformer.h.{}.ln_1.weight",
    "blocks.{}.norm1.bias": "transformer.h.{}.ln_1.bias",
    "blocks.{}.attn.qkv_proj.weight": ("transformer.h.{}.attn.c_attn.weight", TRANSPOSE),
    QKV_WEIGHTS: ("transformer.h.{}.attn.c_attn.weight", chain(FUSE_QKV, TRANSPOSE)),
    "blocks.{}.attn.qkv_proj.bias": "transformer.h.{}.attn.c_attn.bias",
    QKV_BIASES: ("transformer.h.{}.attn.c_attn.bias", FUSE_QKV),
    "blocks.{}.attn.out_proj.weight": ("transformer.h.{}.attn.c_proj.weight", TRANSPOSE),
    "blocks.{}.attn.out_proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "blocks.{}.norm2.weight": "transformer.h.{}.ln_2.weight",
    "blocks.{}.norm2.bias": "transformer.h.{}.ln_2.bias",
    "blocks.{}.mlp.up.weight": ("transformer.h.{}.mlp.c_fc.weight", TRANSPOSE),
    "blocks.{}.mlp.up.bias": "transformer.h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.down.weight": ("transformer.h.{}.mlp.c_proj.weight", TRANSPOSE),
    "blocks.{}.mlp.down.bias": "transformer.h.{}.mlp.c_proj.bias",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
}, ignored=("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias", "lm_head.weight"))

_HF_QKV = ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
           "model.layers.{}.self_attn.v_proj.weight")
_LLAMA_ATTENTION = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{}.norm1.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.attn.q_proj.weight": _HF_QKV[0],
    "blocks.{}.attn.k_proj.weight": _HF_QKV[1],
    "blocks.{}.attn.v_proj.weight": _HF_QKV[2],
    "blocks.{}.attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blocks.{}.attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blocks.{}.attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blocks.{}.attn.qkv_proj.weight": (_HF_QKV, SPLIT_QKV),
    "blocks.{}.attn.qkv_proj.bias": (tuple(n.replace(".weight", ".bias") for n in _HF_QKV), SPLIT_QKV),
    "blocks.{}.attn.out_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.attn.out_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blocks.{}.norm2.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_LLAMA_HEAD = {
    "norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_ROTARY = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)  # a buffer in old checkpoints

LLAMA = KeyMap("HF Llama", {
    **_LLAMA_ATTENTION,
    "blocks.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blocks.{}.mlp.gate.bias": "model.layers.{}.mlp.gate_proj.bias",
    "blocks.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blocks.{}.mlp.up.bias": "model.layers.{}.mlp.up_proj.bias",
    "blocks.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blocks.{}.mlp.down.bias": "model.layers.{}.mlp.down_proj.bias",
    **_LLAMA_HEAD,
}, ignored=_ROTARY)

MIXTRAL = KeyMap("HF Mixtral", {
    **_LLAMA_ATTENTION,
    # what save_pretrained writes (exported)
    "blocks.{}.mlp.router.weight": "model.layers.{}.block_sparse_moe.gate.weight",
    "blocks.{}.mlp.experts.{}.gate.weight": "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
    "blocks.{}.mlp.experts.{}.down.weight": "model.layers.{}.block_sparse_moe.experts.{}.w2.weight",
    "blocks.{}.mlp.experts.{}.up.weight": "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
    # transformers 5's in-memory names, imported when found (1-tuple keys: a dict needs distinct keys)
    ("blocks.{}.mlp.router.weight",): "model.layers.{}.mlp.gate.weight",
    ("blocks.{}.mlp.experts.{}.gate.weight", "blocks.{}.mlp.experts.{}.up.weight"):
        ("model.layers.{}.mlp.experts.gate_up_proj", STACK_GATE_UP),
    ("blocks.{}.mlp.experts.{}.down.weight",): ("model.layers.{}.mlp.experts.down_proj", STACK_EXPERTS),
    **_LLAMA_HEAD,
}, ignored=_ROTARY)

KEYMAPS = {"gpt2": GPT2, "llama": LLAMA, "mixtral": MIXTRAL}
# -- directories -----------------------------------------------------------------

class _Prefixed(Mapping):
    """Old GPT-2 files name weights without the "transformer." prefix (h.0..., wte.weight)."""

    def __init__(self, inner: Mapping):
        self._inner = inner
        self._names = {("" if n == "lm_head.weight" else "transformer.") + n: n for n in inner}

    def __getitem__(self, name):
        return self._inner[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _weights(directory: Path) -> Mapping[str, np.ndarray]:
    if (directory / "model.safetensors").is_file():
        return safetensors_io.SafetensorsFile(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").is_file():
        return safetensors_io.ShardedSafetensors(directory / "model.safetensors.index.json")
    if (directory / "pytorch_model.bin").is_file():
        from gptcore.formats import torch_pt
        return torch_pt.load(directory / "pytorch_model.bin")
    raise FormatError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{directory}: unreadable config.json ({e.__class__.__name__})") from None
    cfg = config_from_hf(hf, str(directory))
    foreign = _weights(directory)
    check_layer_count(cfg, len(foreign), str(directory))
    keymap = KEYMAPS[hf["model_type"]]
    if hf["model_type"] == "gpt2" and not any(n.startswith("transformer.") for n in foreign):
        foreign = _Prefixed(foreign)
    if cfg.tie_embeddings:  # a tied checkpoint may still carry the head's copy
        keymap = keymap._replace(ignored=keymap.ignored + ("lm_head.weight",))
    kept = {"config.json": hf}
    for name in HF_SIDE_FILES:  # regular files of the directory that parse, as the tokenizer
        path = directory / name
        if path.is_file() and (not path.is_symlink() or _inside(path, directory)):
            try:
                kept[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
    return Checkpoint(cfg, from_foreign(foreign, keymap, cfg, str(directory)), tokenizer_path(directory), kept)


HF_SIDE_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def _inside(path: Path, directory: Path) -> bool:
    try:
        check_inside(path, directory)
        return True
    except UserError:
        return False


# the special tokens HF configs name, by role, as the common tokenizers spell them (ours: [eos], [pad])
SPECIAL_TOKENS = {"bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
                  "eos": ("[eos]", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>"),
                  "pad": ("[pad]", "<pad>", "<|finetune_right_pad_id|>")}


def special_tokens(tokenizer_file: Path) -> dict[str, tuple[str, int]]:
    """{role: (token, id)} of the bos / eos / pad tokens a tokenizer.json
    declares (added tokens marked special); a role without one is left out."""
    try:
        added = json.loads(Path(tokenizer_file).read_text(encoding="utf-8")).get("added_tokens") or []
        special = {t["content"]: t["id"] for t in added if t.get("special")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise FormatError(f"{tokenizer_file}: unreadable tokenizer.json ({e.__class__.__name__})") from None
    found = {}
    for role, candidates in SPECIAL_TOKENS.items():
        token = next((t for t in candidates if t in special), None)
        if token is not None:
            found[role] = (token, special[token])
    return found


def with_zero_biases(ckpt: Checkpoint, arch: str) -> Checkpoint:
    """The same function with the biases `arch` always has: a missing bias is
    a zero bias, so a bias-free model (nanoGPT's bias=False, seed 001's)
    exports exactly. GPT-2 has every bias; Llama's attention_bias covers q, k,
    v and o alike, so one of them present adds the others."""
    c = ckpt.cfg
    if arch == "gpt2":
        changes = dict(qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True)
    elif arch == "llama" and c.qkv_bias != c.out_bias:
        changes = dict(qkv_bias=True, out_bias=True)
    else:
        return ckpt
    cfg = c.replace(**changes)
    ours = state_shapes(cfg)
    if cfg == c or set(ours) == set(ckpt.tensors):
        return ckpt
    dtype = np.asarray(ckpt.tensors[next(iter(ckpt.tensors))]).dtype
    tensors = _WithZeros(ckpt.tensors, {n: shape for n, shape in ours.items() if n not in ckpt.tensors}, dtype,
                         list(ours))
    return Checkpoint(cfg, tensors, ckpt.tokenizer, ckpt.hf_source)


class _WithZeros(Mapping):
    """`tensors` and zero arrays for the names of `zeros`, in `order`."""

    def __init__(self, tensors: Mapping, zeros: dict[str, tuple], dtype, order: list[str]):
        self._tensors, self._zeros, self._dtype, self._order = tensors, zeros, dtype, order

    def __getitem__(self, name):
        return np.zeros(self._zeros[name], self._dtype) if name in self._zeros else self._tensors[name]

    def __iter__(self):
        return iter(self._order)

    def __len__(self):
        return len(self._order)


MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's classic default ("5GB")


def with_source_fields(config: dict, source: dict | None) -> dict:
    """An exported config.json with every field of the HF config the model
    was imported from (same model_type) that ours does not set: what we
    cannot hold (initializer_range, use_cache, transformers_version, ...)
    comes back as it was; the special-token ids we do not know stay theirs,
    and a field we write keeps their value where it means the same model."""
    if not source or source.get("model_type") != config["model_type"]:
        return config
    merged = {**source, **{k: v for k, v in config.items() if v is not None or k not in source}}
    merged.update({k: v for k, v in source.items() if k.endswith("_token_id") and v is not None})  # theirs
    meaning = config_from_hf(merged, "config")
    for key, value in source.items():  # their spelling of a field (head_dim None for the default) where it means ours
        if merged.get(key) != value:
            candidate = {**merged, key: value}
            try:
                if config_from_hf(candidate, "config") == meaning:
                    merged = candidate
            except UserError:
                pass
    return merged


def write(directory: str | Path, ckpt: Checkpoint, arch: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write an HF directory at `directory` (which must not exist yet), its
    weights sharded above max_shard_bytes as save_pretrained shards them."""
    directory = Path(directory)
    arch = arch or default_arch(ckpt.cfg)
    if arch in ARCHS:
        ckpt = with_zero_biases(ckpt, arch)
    source = ckpt.hf_source or {}
    config = with_source_fields(config_to_hf(ckpt.cfg, arch, dtype_name(ckpt.tensors)), source.get("config.json"))
    pairs = to_foreign(ckpt.tensors, KEYMAPS[arch], ckpt.cfg)
    directory.mkdir(parents=True)
    safetensors_io.write_sharded(directory, pairs, max_shard_bytes, {"format": "pt"})
    same_arch = source.get("config.json", {}).get("model_type") == arch
    if ckpt.tokenizer is not None:
        # transformers' AutoTokenizer then gives our ids for every text (Tokenizer.hf_exact_json)
        (directory / "tokenizer.json").write_text(Tokenizer.load(ckpt.tokenizer).hf_exact_json(), encoding="utf-8")
        tokens = special_tokens(ckpt.tokenizer)
        ids = {f"{role}_token_id": i for role, (_, i) in tokens.items()}
        ids = {k: config[k] if config.get(k) is not None else v for k, v in ids.items()}  # an HF source's stay
        config.update(ids)
        side = {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                          "model_max_length": ckpt.cfg.context_length,
                                          **{f"{role}_token": token for role, (token, _) in tokens.items()}},
                "generation_config.json": {"_from_model_config": True, "bos_token_id": None, "eos_token_id": None,
                                           "pad_token_id": None, **ids}}
        if same_arch:  # the files the model came with, as they were
            side.update({name: source[name] for name in HF_SIDE_FILES if name in source})
        for name, content in side.items():
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
