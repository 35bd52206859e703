"""Hugging Face config.json <-> our ModelConfig, for GPT-2, Llama and
Mixtral, field by field (gptcore.formats.hf has the weights and directories).
A choice of ours that the target architecture cannot express is a one-line
FormatError naming the field; .pt and safetensors hold any config.
"""

from __future__ import annotations

from gptcore.config import ConfigError, ModelConfig
from gptcore.formats import FormatError

ARCHS = ("gpt2", "llama", "mixtral")
_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
_GPT2_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_GPT2_ACTS_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


# -- configs -------------------------------------------------------------------

def default_arch(cfg: ModelConfig) -> str:
    """The HF architecture an export targets unless one is named."""
    if cfg.is_moe:
        return "mixtral"
    return "gpt2" if cfg.position == "learned" else "llama"


def _require(cfg: ModelConfig, arch: str, checks: list[tuple[bool, str, str]]) -> None:
    for ok, field, why in checks:
        if not ok:
            raise FormatError(f"cannot express {field}={getattr(cfg, field)!r} in HF {arch}: {why} "
                              f"(.pt and safetensors hold any config)")


def config_to_hf(cfg: ModelConfig, arch: str, dtype: str) -> dict:
    """Our config -> an HF config.json dict for `arch`; FormatError names a field `arch` cannot express."""
    c = cfg
    if arch not in ARCHS:
        raise FormatError(f"unknown HF architecture {arch!r} (choose from {', '.join(ARCHS)})")
    common = {"architectures": [_CLASSES[arch]], "model_type": arch, "vocab_size": c.vocab_size,
              "initializer_range": c.init_std, "tie_word_embeddings": c.tie_embeddings, "dtype": dtype,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    _require(c, arch, [
        (c.attn_out_proj, "attn_out_proj", "its attention always has an output projection"),
        (c.ffn_residual, "ffn_residual", "its blocks add the MLP's output to the residual stream"),
    ])
    if arch == "gpt2":
        _require(c, arch, [
            (c.position == "learned", "position", "GPT-2 has learned positions"),
            (c.norm == "layernorm", "norm", "GPT-2 uses LayerNorm"),
            (c.norm_bias, "norm_bias", "GPT-2's LayerNorms have biases"),
            (c.norm_placement == "pre", "norm_placement", "GPT-2 is pre-norm"),
            (c.mlp in _GPT2_ACTS, "mlp", "GPT-2's MLP is not gated"),
            (not c.is_moe, "n_experts", "GPT-2 has no mixture of experts"),
            (c.n_kv_heads == c.n_heads, "n_kv_heads", "GPT-2 has no grouped-query attention"),
            (c.head_dim * c.n_heads == c.d_model, "head_dim", "GPT-2's head_dim is d_model // n_heads"),
            (c.qkv_bias, "qkv_bias", "GPT-2's c_attn has a bias"),
            (c.out_bias, "out_bias", "GPT-2's c_proj has a bias"),
            (c.mlp_bias, "mlp_bias", "GPT-2's MLP has biases"),
            (c.tie_embeddings, "tie_embeddings", "GPT-2 ties lm_head to wte"),
            (not c.lm_head_bias, "lm_head_bias", "GPT-2's lm_head has no bias"),
        ])
        return {**common, "n_positions": c.context_length, "n_embd": c.d_model, "n_layer": c.n_layers,
                "n_head": c.n_heads, "n_inner": c.d_ff, "activation_function": _GPT2_ACTS[c.mlp],
                "layer_norm_epsilon": c.norm_eps, "embd_pdrop": c.embd_dropout, "attn_pdrop": c.attn_dropout,
                "resid_pdrop": c.resid_dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    _require(c, arch, [
        (c.position == "rope", "position", f"{arch} uses rotary positions"),
        (c.norm == "rmsnorm", "norm", f"{arch} uses RMSNorm"),
        (c.norm_placement == "pre", "norm_placement", f"{arch} is pre-norm"),
        (c.mlp == "swiglu", "mlp", f"{arch}'s MLP is SwiGLU"),
        (c.qkv_bias == c.out_bias, "out_bias", f"{arch}'s attention_bias covers q, k, v and o alike"),
        (not c.lm_head_bias, "lm_head_bias", f"{arch}'s lm_head has no bias"),
    ])
    out = {**common, "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
           "hidden_act": "silu", "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps,
           "rope_theta": c.rope_base, "rope_parameters": {"rope_theta": c.rope_base, **_rope_scaling_to_hf(c)},
           "attention_dropout": c.attn_dropout}
    if c.rope_scaling != "none":  # transformers 4 reads rope_scaling, 5 rope_parameters
        out["rope_scaling"] = _rope_scaling_to_hf(c)
    if arch == "llama":
        _require(c, arch, [(not c.is_moe, "n_experts", "Llama has no mixture of experts (use mixtral)")])
        return {**out, "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}
    _require(c, arch, [
        (c.is_moe, "n_experts", "Mixtral is a mixture of experts (use llama)"),
        (not c.router_bias, "router_bias", "Mixtral's router has no bias"),
        (not c.shared_expert, "shared_expert", "Mixtral has no shared expert"),
        (not c.mlp_bias, "mlp_bias", "Mixtral's experts have no biases"),
        (not c.qkv_bias, "qkv_bias", "Mixtral's attention has no biases"),
    ])
    return {**out, "num_local_experts": c.n_experts, "num_experts_per_tok": c.top_k,
            "router_aux_loss_coef": c.aux_loss_coef, "output_router_logits": False, "sliding_window": None}


def _rope_scaling_to_hf(c: ModelConfig) -> dict:
    if c.rope_scaling == "none":
        return {"rope_type": "default"}
    return {"rope_type": "llama3", "factor": c.rope_factor, "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor, "original_max_position_embeddings": c.rope_original_context}


def _rope_scaling_from_hf(rope: dict) -> dict:
    """Our rope_scaling fields of HF's rope_parameters / rope_scaling."""
    if rope.get("rope_type", rope.get("type", "default")) != "llama3":
        return {}
    return dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_context=int(rope["original_max_position_embeddings"]))


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """An HF config.json dict (gpt2, llama or mixtral) -> our config."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise FormatError(f"{where}: model_type {arch!r} is not supported (only {', '.join(ARCHS)})")

    def need(field, ok, why):
        if not ok:
            raise FormatError(f"{where}: {field}={hf.get(field)!r} is not supported ({why})")

    try:
        if arch == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            need("activation_function", act in _GPT2_ACTS_IN, f"one of {', '.join(_GPT2_ACTS_IN)}")
            need("scale_attn_weights", hf.get("scale_attn_weights", True), "scores are always scaled")
            need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"), "no layer scaling")
            need("add_cross_attention", not hf.get("add_cross_attention"), "decoder-only")
            need("tie_word_embeddings", hf.get("tie_word_embeddings", True), "GPT-2 ties lm_head to wte")
            return ModelConfig(
                vocab_size=hf["vocab_size"], context_length=hf["n_positions"], d_model=hf["n_embd"],
                n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                position="learned", qkv_fused=True, qkv_bias=True, out_bias=True, mlp=_GPT2_ACTS_IN[act],
                mlp_bias=True, norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=True, embd_dropout=float(hf.get("embd_pdrop", 0.0)),
                attn_dropout=float(hf.get("attn_pdrop", 0.0)), resid_dropout=float(hf.get("resid_pdrop", 0.0)),
                init_std=float(hf.get("initializer_range", 0.02)))
        need("hidden_act", hf.get("hidden_act", "silu") == "silu", "SwiGLU with silu")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        need("rope_parameters", isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default"))
             in ("default", "llama3"), "plain RoPE or Llama 3's scaling")
        theta = rope.get("rope_theta") or hf.get("rope_theta") or (1e6 if arch == "mixtral" else 1e4)
        heads = hf["num_attention_heads"]
        common = dict(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
            position="rope", rope_base=float(theta), qkv_fused=False, mlp="swiglu", norm="rmsnorm",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attn_dropout=float(hf.get("attention_dropout", 0.0)),
            init_std=float(hf.get("initializer_range", 0.02)), **_rope_scaling_from_hf(rope))
        if arch == "llama":
            bias = bool(hf.get("attention_bias", False))
            return ModelConfig(**common, context_length=hf.get("max_position_embeddings", 2048),
                               norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=bias, out_bias=bias,
                               mlp_bias=bool(hf.get("mlp_bias", False)))
        need("sliding_window", hf.get("sliding_window") is None, "full attention only")
        return ModelConfig(**common, context_length=hf.get("max_position_embeddings", 4096 * 32),
                           norm_eps=float(hf.get("rms_norm_eps", 1e-5)), n_experts=hf["num_local_experts"],
                           top_k=hf.get("num_experts_per_tok", 2),
                           aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    except KeyError as e:
        raise FormatError(f"{where}: config.json has no {e.args[0]!r}") from None
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type (rope factor "abc", ...)
        raise FormatError(f"{where}: unreadable config.json ({e})") from None
