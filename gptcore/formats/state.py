"""Our weight names and shapes for a config, without building a model.

The order is the torchgpt state_dict's (module registration order); a test
checks both twins against it for every preset.
"""

from __future__ import annotations

from typing import Mapping

from gptcore.config import ModelConfig


def _linear(name: str, n_out: int, n_in: int, bias: bool) -> dict[str, tuple]:
    out = {f"{name}.weight": (n_out, n_in)}  # torch Linear layout (out, in)
    if bias:
        out[f"{name}.bias"] = (n_out,)
    return out


def _norm(cfg: ModelConfig, name: str) -> dict[str, tuple]:
    out = {f"{name}.weight": (cfg.d_model,)}
    if cfg.norm == "layernorm" and cfg.norm_bias:
        out[f"{name}.bias"] = (cfg.d_model,)
    return out


def _mlp(cfg: ModelConfig, name: str) -> dict[str, tuple]:
    c, out = cfg, {}
    if c.mlp == "swiglu":
        out |= _linear(f"{name}.gate", c.d_ff, c.d_model, c.mlp_bias)
    out |= _linear(f"{name}.up", c.d_ff, c.d_model, c.mlp_bias)
    out |= _linear(f"{name}.down", c.d_model, c.d_ff, c.mlp_bias)
    return out


def state_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{torch-style name: shape} of every weight of `cfg`'s model."""
    c = cfg
    out = {"tok_emb.weight": (c.vocab_size, c.d_model)}
    if c.position == "learned":
        out["pos_emb.weight"] = (c.context_length, c.d_model)
    for i in range(c.n_layers):
        b = f"blocks.{i}"
        out |= _norm(c, f"{b}.norm1") | _norm(c, f"{b}.norm2")
        if c.qkv_fused:
            out |= _linear(f"{b}.attn.qkv_proj", c.q_dim + 2 * c.kv_dim, c.d_model, c.qkv_bias)
        else:
            out |= _linear(f"{b}.attn.q_proj", c.q_dim, c.d_model, c.qkv_bias)
            out |= _linear(f"{b}.attn.k_proj", c.kv_dim, c.d_model, c.qkv_bias)
            out |= _linear(f"{b}.attn.v_proj", c.kv_dim, c.d_model, c.qkv_bias)
        if c.attn_out_proj:
            out |= _linear(f"{b}.attn.out_proj", c.d_model, c.q_dim, c.out_bias)
        if c.is_moe:
            out |= _linear(f"{b}.mlp.router", c.n_experts, c.d_model, c.router_bias)
            for e in range(c.n_experts):
                out |= _mlp(c, f"{b}.mlp.experts.{e}")
            if c.shared_expert:
                out |= _mlp(c, f"{b}.mlp.shared_expert")
        else:
            out |= _mlp(c, f"{b}.mlp")
    if c.norm_placement == "pre":
        out |= _norm(c, "norm_f")
    if c.tie_embeddings:
        if c.lm_head_bias:
            out["lm_head_bias"] = (c.vocab_size,)
    else:
        out |= _linear("lm_head", c.vocab_size, c.d_model, c.lm_head_bias)
    return out


def check_layer_count(cfg: ModelConfig, n_tensors: int, where: str) -> None:
    """A config cannot have more layers than its file has tensors (every
    layer has some): checked before any per-layer name is made, so a config
    saying 10**8 layers is one line, not minutes of building names."""
    from gptcore.formats import FormatError
    if cfg.n_layers > n_tensors:
        raise FormatError(f"{where}: the config says {cfg.n_layers:,} layers, the file holds only {n_tensors:,} "
                          f"tensors")


def check_state(shapes: dict[str, tuple], cfg: ModelConfig, where: str) -> None:
    """Missing, unexpected and mis-shaped weights (by our names) -> FormatError naming the first."""
    from gptcore.formats import FormatError
    check_layer_count(cfg, len(shapes), where)
    expected = state_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise FormatError(f"{where}: missing weight {name!r}")
        if tuple(shapes[name]) != shape:
            raise FormatError(f"{where}: weight {name!r} has shape {tuple(shapes[name])}, the config expects {shape}")
    unexpected = [n for n in shapes if n not in expected]
    if unexpected:
        raise FormatError(f"{where}: unexpected weight {unexpected[0]!r}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


class InOrder(Mapping):
    """`tensors` (a lazy mapping, say) seen in our canonical order."""

    def __init__(self, tensors: Mapping, cfg: ModelConfig):
        self._tensors, self._names = tensors, list(state_shapes(cfg))

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
