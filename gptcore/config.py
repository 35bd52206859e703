"""The model config shared by both twins.

This module imports neither JAX nor PyTorch: `jaxgpt` and `torchgpt` build the
same network from the same `ModelConfig`. Every choice on which the two
frameworks' defaults differ (norm eps, GELU approximation, RoPE base) is an
explicit field, so no default can silently disagree between the twins.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from gptcore.errors import UserError

POSITIONS = ("learned", "sinusoidal", "rope", "none")  # each twin's positions.KINDS implements these
ROPE_SCALINGS = ("none", "llama3")  # gptcore.rope.SCALINGS
MLPS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
INITS = ("normal", "torch_default")
MOE_IMPLS = ("dense", "capacity", "ragged")


class ConfigError(UserError):
    """A config that cannot describe a model. The message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture choice of a decoder-only transformer.

    Fields left as None are derived in `__post_init__` (n_kv_heads = n_heads,
    head_dim = d_model // n_heads, d_ff = 4 * d_model); after construction every
    field holds a concrete value.
    """

    # sizes
    vocab_size: int = 65
    context_length: int = 128  # longest sequence the positions support
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention; 1: multi-query
    head_dim: int | None = None  # may differ from d_model // n_heads (seed 000: 256 / 6 -> 42)
    d_ff: int | None = None  # hidden width of the MLP (of each expert under MoE)

    # positions
    position: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    rope_base: float = 10000.0  # rotate-half (GPT-NeoX / HF Llama) layout
    # RoPE frequency scaling for contexts past the trained one (gptcore.rope); "llama3" is Llama 3.1's:
    # wavelengths above original_context / low_freq_factor slow down by rope_factor, those below
    # original_context / high_freq_factor stay, and the band between is interpolated
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    # attention
    qkv_fused: bool = True  # one [q | k | v] projection, else q_proj, k_proj, v_proj
    qkv_bias: bool = False
    attn_out_proj: bool = True  # False: the heads are concatenated with no output projection (seed 003's text;
    # needs n_heads * head_dim == d_model)
    out_bias: bool = False  # attention output projection

    # mlp
    mlp: Literal["relu", "gelu", "gelu_tanh", "swiglu"] = "relu"
    mlp_bias: bool = False
    n_experts: int = 0  # 0: a dense MLP; >= 2: mixture of experts
    top_k: int = 2  # experts per token; weights = softmax over the top-k router logits
    shared_expert: bool = False  # DeepSeek-style expert applied to every token
    router_bias: bool = False
    aux_loss_coef: float = 0.0  # Switch / Mixtral load-balancing loss weight
    router_z_loss: float = 0.0  # ST-MoE router z-loss weight: mean over tokens of logsumexp(router logits)^2
    moe_impl: Literal["dense", "capacity", "ragged"] = "dense"  # how tokens reach their experts (the same
    # function when nothing is dropped; no parameter changes): "dense" every expert on every token, combined by
    # the routing weights (the reference); "capacity" sort-based dispatch into per-expert buffers of
    # expert_capacity rows per sequence; "ragged" dropless grouped matmuls over the tokens sorted by expert
    capacity_factor: float = 1.25  # "capacity": rows per expert and sequence, ceil(factor * T * top_k / n_experts)

    ffn_residual: bool = True  # False: seed 003's block, x = ffn(norm2(x)) with no residual around the MLP

    # normalisation
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_placement: Literal["pre", "post"] = "pre"

    # output head
    tie_embeddings: bool = True
    lm_head_bias: bool = False

    # dropout (training only; both twins are deterministic in eval mode)
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    mlp_dropout: float = 0.0  # on the MLP's hidden activations (seed 001's FeedForward), every expert's too

    # initialisation
    init: Literal["normal", "torch_default"] = "normal"  # "normal": N(0, init_std), zero biases, the scaled
    # residual init; "torch_default": PyTorch's nn.Linear (U(+-1/sqrt(fan_in)) weights and biases) and
    # nn.Embedding (N(0, 1)) defaults, as models that never re-initialise get (seed 002)
    init_std: float = 0.02
    scaled_residual_init: bool = True  # out_proj / MLP down: init_std / sqrt(2 * n_layers)

    def __post_init__(self):
        check_field_types(self, _CHOICES)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, _default_derived(self, name))
        _check_values(self)

    # -- derived quantities -------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def expert_capacity(self, n_tokens: int) -> int:
        """Rows of each expert's buffer under moe_impl = "capacity" for a group
        (a sequence) of n_tokens: ceil(capacity_factor * n_tokens * top_k /
        n_experts), at most n_tokens (a token reaches an expert once:
        dropless from there)."""
        return min(n_tokens, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    @property
    def residual_init_std(self) -> float:
        if self.scaled_residual_init:
            return self.init_std / math.sqrt(2 * self.n_layers)
        return self.init_std

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes` applied; derived fields are derived again
        unless given."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if fields[name] == _default_derived(self, name):
                fields[name] = None  # stays derived from the new sizes
        unknown = set(changes) - set(fields)
        if unknown:
            raise ConfigError(f"unknown model config key {sorted(unknown)[0]!r}")
        fields.update(changes)
        return ModelConfig(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a model config is a JSON object of fields, not {type(d).__name__} {str(d)[:40]}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key {unknown[0]!r}")
        return cls(**d)


def _default_derived(cfg: ModelConfig, name: str):
    if name == "n_kv_heads":
        return cfg.n_heads
    if name == "head_dim":
        return cfg.d_model // cfg.n_heads if cfg.n_heads > 0 else 0
    return 4 * cfg.d_model


_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_CHOICES = {"position": POSITIONS, "rope_scaling": ROPE_SCALINGS, "mlp": MLPS, "norm": NORMS,
            "norm_placement": NORM_PLACEMENTS, "init": INITS, "moe_impl": MOE_IMPLS}


def check_field_types(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    """Type-check every field of a config dataclass (string annotations:
    int, float, bool, str, "X | None", Literal[...]) and the allowed values of
    the fields named in `choices`. An int is accepted for a float field and
    converted; a bool is never an int; every float is finite and every int
    fits in 64 bits (numbers that cannot describe a run, whatever the field).
    One-line ConfigError naming the field."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), f.type
        if value is None and kind.endswith("| None"):
            continue
        expected = str if kind.startswith("Literal") else _FIELD_TYPES[kind.removesuffix(" | None")]
        if expected is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63:
            value = float(value)
            object.__setattr__(cfg, f.name, value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(f"{f.name}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
        if expected is float and not math.isfinite(value):
            raise ConfigError(f"{f.name}: must be a finite number (got {value!r})")
        if expected is int and not -2 ** 63 <= value < 2 ** 63:
            raise ConfigError(f"{f.name}: {value} does not fit in 64 bits")
        if f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices[f.name])}")


def requirement(cfg):
    """require(cond, field, why): a one-line ConfigError naming `field` and its value unless cond."""
    def require(cond: bool, field: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"{field}: {why} (got {getattr(cfg, field)!r})")
    return require


def _check_values(c: ModelConfig) -> None:
    require = requirement(c)

    for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "head_dim", "d_ff"):
        require(getattr(c, name) > 0, name, "must be positive")
    require(c.n_heads % c.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={c.n_heads}")
    require(c.position != "rope" or c.head_dim % 2 == 0, "head_dim", "must be even with rope positions")
    require(c.position != "sinusoidal" or c.d_model % 2 == 0, "d_model", "must be even with sinusoidal positions")
    require(c.rope_base > 1.0, "rope_base", "must be > 1")
    require(c.rope_scaling == "none" or c.position == "rope", "rope_scaling", "needs position = \"rope\"")
    require(c.rope_factor >= 1.0, "rope_factor", "must be >= 1")
    require(0.0 < c.rope_low_freq_factor < c.rope_high_freq_factor, "rope_low_freq_factor",
            f"must be in (0, rope_high_freq_factor={c.rope_high_freq_factor})")
    require(c.rope_original_context > 0, "rope_original_context", "must be positive")
    require(c.norm_eps > 0.0, "norm_eps", "must be positive")
    require(c.n_experts == 0 or c.n_experts >= 2, "n_experts", "must be 0 (dense MLP) or at least 2")
    if c.is_moe:
        require(1 <= c.top_k <= c.n_experts, "top_k", f"must be in [1, n_experts={c.n_experts}]")
    else:
        require(not c.shared_expert, "shared_expert", "needs n_experts >= 2")
    require(c.aux_loss_coef >= 0.0, "aux_loss_coef", "must be >= 0")
    require(c.router_z_loss >= 0.0, "router_z_loss", "must be >= 0")
    require(c.capacity_factor > 0.0, "capacity_factor", "must be positive")
    require(c.attn_out_proj or c.q_dim == c.d_model, "attn_out_proj",
            f"False needs n_heads * head_dim == d_model (got {c.q_dim} and {c.d_model})")
    for name in ("embd_dropout", "attn_dropout", "resid_dropout", "mlp_dropout"):
        require(0.0 <= getattr(c, name) < 1.0, name, "must be in [0, 1)")
    require(c.init_std > 0.0, "init_std", "must be positive")
