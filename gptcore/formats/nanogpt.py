"""nanoGPT checkpoints (karpathy/nanoGPT train.py's ckpt.pt), import only.

A ckpt.pt holds {"model_args": {n_layer, n_head, n_embd, block_size, bias,
vocab_size, dropout}, "model": state_dict, "optimizer": ..., ...}; keys carry
"_orig_mod." when the model was torch.compile'd. nanoGPT's model is GPT-2's
architecture with nn.Linear layouts (out, in) (not GPT-2's Conv1D), exact
GELU (nn.GELU()), LayerNorm eps 1e-5 with an optional bias, a fused c_attn
in q | k | v order and an lm_head tied to wte (saved as a second copy). The
attn.bias causal-mask buffer exists when flash attention is unavailable.
"""

from __future__ import annotations

from pathlib import Path

from gptcore.config import ConfigError, ModelConfig
from gptcore.formats import Checkpoint, FormatError
from gptcore.formats.keymap import KeyMap, from_foreign
from gptcore.formats.state import check_layer_count

NANOGPT = KeyMap("nanoGPT", {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "blocks.{}.norm1.weight": "transformer.h.{}.ln_1.weight",
    "blocks.{}.norm1.bias": "transformer.h.{}.ln_1.bias",
    "blocks.{}.attn.qkv_proj.weight": "transformer.h.{}.attn.c_attn.weight",
    "blocks.{}.attn.qkv_proj.bias": "transformer.h.{}.attn.c_attn.bias",
    "blocks.{}.attn.out_proj.weight": "transformer.h.{}.attn.c_proj.weight",
    "blocks.{}.attn.out_proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "blocks.{}.norm2.weight": "transformer.h.{}.ln_2.weight",
    "blocks.{}.norm2.bias": "transformer.h.{}.ln_2.bias",
    "blocks.{}.mlp.up.weight": "transformer.h.{}.mlp.c_fc.weight",
    "blocks.{}.mlp.up.bias": "transformer.h.{}.mlp.c_fc.bias",
    "blocks.{}.mlp.down.weight": "transformer.h.{}.mlp.c_proj.weight",
    "blocks.{}.mlp.down.bias": "transformer.h.{}.mlp.c_proj.bias",
    "norm_f.weight": "transformer.ln_f.weight",
    "norm_f.bias": "transformer.ln_f.bias",
}, ignored=("transformer.h.{}.attn.bias", "lm_head.weight"))  # mask buffer; tied copy of wte

_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


def config_from_model_args(args: dict, where: str) -> ModelConfig:
    if not isinstance(args, dict):
        raise FormatError(f"{where}: model_args is a {type(args).__name__}, not a dict")
    for name in _ARGS:
        if name not in args:
            raise FormatError(f"{where}: model_args has no {name!r}")
    dropout = args.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise FormatError(f"{where}: model_args: dropout is {dropout!r}, not a number")
    try:
        return ModelConfig(
            vocab_size=args["vocab_size"], context_length=args["block_size"], d_model=args["n_embd"],
            n_layers=args["n_layer"], n_heads=args["n_head"], position="learned", qkv_fused=True,
            qkv_bias=args["bias"], out_bias=args["bias"], mlp="gelu", mlp_bias=args["bias"],
            norm="layernorm", norm_eps=1e-5, norm_bias=args["bias"], tie_embeddings=True,
            embd_dropout=float(dropout), attn_dropout=float(dropout), resid_dropout=float(dropout))
    except ConfigError as e:
        raise FormatError(f"{where}: model_args: {e}") from None


def read(ckpt: dict, where: str | Path) -> Checkpoint:
    """A loaded nanoGPT ckpt.pt (see torch_pt.load) -> Checkpoint."""
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise FormatError(f"{where}: not a nanoGPT checkpoint (no 'model_args' and 'model')")
    cfg = config_from_model_args(ckpt["model_args"], str(where))
    if not isinstance(ckpt["model"], dict):
        raise FormatError(f"{where}: its 'model' is a {type(ckpt['model']).__name__}, not a state dict")
    check_layer_count(cfg, len(ckpt["model"]), str(where))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    wte, head = state.get("transformer.wte.weight"), state.get("lm_head.weight")
    if wte is not None and head is not None and not (wte == head).all():
        raise FormatError(f"{where}: lm_head.weight differs from transformer.wte.weight (nanoGPT ties them)")
    return Checkpoint(cfg, from_foreign(state, NANOGPT, cfg, str(where)))
