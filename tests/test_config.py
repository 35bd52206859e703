"""The model config and presets: derived fields, one-line errors naming the field."""

from __future__ import annotations

import tomllib

import pytest

from gptcore.config import ConfigError, ModelConfig
from gptcore.presets import (
    CONFIG_DIR,
    load_config,
    load_model_config,
    parse_override,
    preset_names,
)


def test_derived_fields():
    cfg = ModelConfig(d_model=256, n_heads=6)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (6, 42, 1024)
    assert cfg.q_dim == 252
    assert cfg.replace(n_heads=4).head_dim == 64  # derived fields follow the new sizes
    assert cfg.replace(head_dim=40).head_dim == 40
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(position="rope", head_dim=7), "head_dim"),
    (dict(position="sinusoidal", d_model=33, n_heads=3), "d_model"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(mlp="gelu_fast"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(position="alibi"), "position"),
    (dict(attn_dropout=1.0), "attn_dropout"),
    (dict(n_experts=1), "n_experts"),
    (dict(shared_expert=True), "shared_expert"),
    (dict(d_model="128"), "d_model"),
    (dict(tie_embeddings=1), "tie_embeddings"),
    (dict(n_layers=2.0), "n_layers"),
])
def test_invalid_configs_fail_with_a_one_line_error_naming_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes)
    message = str(e.value)
    assert message.startswith(field + ":") and "\n" not in message


def test_every_preset_loads():
    names = preset_names()
    for required in ("debug", "seed000_shijing", "seed000_poems", "seed001_mini", "seed002_moe",
                     "seed003_gpt", "gpt2", "llama", "mixtral"):
        assert required in names
    for name in names:  # each explicit [model] key is in the config as written, and the config round-trips
        cfg = load_model_config(name)
        written = tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text()).get("model", {})
        assert {k: getattr(cfg, k) for k in written} == written, name
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg, name


def test_seed_presets_are_the_texts_models():
    s1 = load_model_config("seed001_mini")
    assert (s1.d_model, s1.n_heads, s1.n_layers, s1.d_ff, s1.context_length) == (128, 4, 4, 512, 128)
    assert not (s1.qkv_bias or s1.out_bias or s1.mlp_bias) and s1.tie_embeddings and s1.mlp == "relu"
    s2 = load_model_config("seed002_moe")
    assert (s2.n_layers, s2.n_heads, s2.n_kv_heads, s2.d_model, s2.n_experts, s2.top_k) == (8, 8, 4, 768, 8, 3)
    assert (s2.d_ff, s2.context_length, s2.vocab_size, s2.position, s2.norm) == (3072, 512, 10000, "rope", "rmsnorm")
    assert s2.mlp == "swiglu" and s2.mlp_bias and not s2.tie_embeddings and s2.lm_head_bias
    s0 = load_model_config("seed000_poems")
    assert (s0.d_model, s0.n_heads, s0.head_dim, s0.n_layers, s0.context_length) == (256, 6, 42, 6, 32)


def test_overrides_and_their_errors(tmp_path):
    cfg = load_model_config("debug", ["model.n_layers=3", 'model.mlp="gelu"', "model.norm_eps=1e-3"])
    assert (cfg.n_layers, cfg.mlp, cfg.norm_eps) == (3, "gelu", 1e-3)
    assert parse_override("model.mlp=relu") == (["model", "mlp"], "relu")  # bare words are strings
    for bad, words in [(["model.n_layer=3"], "model.n_layer"), (["n_layers=3"], "section.key"),
                       (["model.n_layers"], "section.key=value"), (["model.n_layers=abc"], "n_layers")]:
        with pytest.raises(ConfigError, match=words):
            load_config("debug", bad)
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("[model]\nd_modle = 3\n")
    with pytest.raises(ConfigError, match="unknown key model.d_modle"):
        load_model_config(bad_file)
    bad_file.write_text("[modle]\nd_model = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[modle\]"):
        load_config(bad_file)
    bad_file.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad_file)
    with pytest.raises(ConfigError, match="no config file"):
        load_config("no_such_preset")
