"""Converted checkpoints compute the same function: jaxgpt, torchgpt and
Hugging Face transformers logits agree (fp32, CPU, <= 1e-4, Levanter's
tolerance against HF) for GPT-2-, Llama- and Mixtral-shaped models in both
directions, and a nanoGPT ckpt.pt imports and matches a nanoGPT forward
written out here. HF models are small, randomly initialised and written by
save_pretrained into tmp dirs; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import jax_forward, max_diff, tokens_for, torch_forward, twins

import jaxgpt.generate as jgen
import torchgpt.model as tm
from gptcore.config import ModelConfig
from gptcore.formats import torch_pt
from jaxgpt.checkpoint import load_model
from jaxgpt.convert import convert
from jaxgpt.model import state_arrays

HF_TOL = 1e-4
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new",
        bos_token_id=0, eos_token_id=0),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5),
    "llama_mqa_tied_bias": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64),
    # Llama 3.1's RoPE scaling; head_dim 16 at base 1e4 puts the wavelengths (6.3 .. 2e4) in all three of its
    # bands for an original context of 32: kept (< 8), interpolated (8 .. 32) and slowed by the factor (> 32)
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
}
HF_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
              "mixtral": transformers.MixtralForCausalLM}


def hf_model(name: str, seed: int = 0):
    """A small random HF model; norm gains and biases moved off 1 and 0 so they count."""
    torch.manual_seed(seed)
    cfg = HF_CONFIGS[name]()
    model = HF_CLASSES[cfg.model_type](cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens).long()).logits.numpy()


def both_twins(jax_dir):
    """(cfg, torch model, jax params) from a jaxgpt model directory."""
    cfg, params, _ = load_model(jax_dir)
    return cfg, tm.load_state_arrays(state_arrays(params), cfg), params


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_save_pretrained_loads_into_both_twins(name, tmp_path):
    """HF -> jaxgpt dir and HF -> .pt: both twins give HF's logits. The
    Llama cases pin RoPE: HF's rotate-half is ours, no q/k permutation."""
    model = hf_model(name)
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "jax")
    convert(tmp_path / "hf", tmp_path / "model.pt")
    cfg, _, params = both_twins(tmp_path / "jax")
    tmodel = tm.load_state_arrays(torch_pt.load(tmp_path / "model.pt")["model"], cfg)
    tokens = tokens_for(cfg, length=48)
    expected = hf_logits(model, tokens)
    assert max_diff(torch_forward(tmodel, tokens).logits, expected) <= HF_TOL
    assert max_diff(jax_forward(cfg, params, tokens).logits, expected) <= HF_TOL


OURS = {
    "gpt2": ModelConfig(vocab_size=96, context_length=32, d_model=32, n_layers=2, n_heads=4, position="learned",
                        qkv_bias=True, out_bias=True, mlp="gelu_tanh", mlp_bias=True, tie_embeddings=True),
    "gpt2_exact_gelu_separate_qkv": ModelConfig(
        vocab_size=96, context_length=32, d_model=32, n_layers=2, n_heads=4, position="learned", qkv_fused=False,
        qkv_bias=True, out_bias=True, mlp="gelu", mlp_bias=True, tie_embeddings=True, d_ff=80),
    "llama_fused_qkv": ModelConfig(vocab_size=96, context_length=32, d_model=32, n_layers=2, n_heads=4,
                                   n_kv_heads=2, d_ff=48, position="rope", rope_base=500.0, qkv_fused=True,
                                   mlp="swiglu", norm="rmsnorm", norm_eps=1e-6, tie_embeddings=False),
    "llama_head_dim_12": ModelConfig(vocab_size=96, context_length=32, d_model=32, n_layers=2, n_heads=4,
                                     n_kv_heads=4, head_dim=12, d_ff=48, position="rope", qkv_fused=False,
                                     mlp="swiglu", norm="rmsnorm", tie_embeddings=True),
    "mixtral": ModelConfig(vocab_size=96, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=48, position="rope", rope_base=1e6, qkv_fused=False, mlp="swiglu", norm="rmsnorm",
                           n_experts=4, top_k=2, tie_embeddings=False),
    "llama3_rope_scaling": ModelConfig(vocab_size=96, context_length=64, d_model=32, n_layers=2, n_heads=2,
                                       n_kv_heads=1, d_ff=48, position="rope", rope_scaling="llama3",
                                       rope_factor=4.0, rope_original_context=16, qkv_fused=False, mlp="swiglu",
                                       norm="rmsnorm"),
}


@pytest.mark.parametrize("name", list(OURS))
def test_export_loads_in_transformers(name, tmp_path):
    """.pt -> HF dir -> AutoModelForCausalLM: HF gives our logits."""
    cfg = OURS[name]
    tmodel, params = twins(cfg)
    torch_pt.save(tmp_path / "model.pt", {"config": cfg.to_dict()}, tm.state_arrays(tmodel).items())
    convert(tmp_path / "model.pt", tmp_path / "hf", dst_format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = tokens_for(cfg, length=12)
    ours = torch_forward(tmodel, tokens).logits
    assert max_diff(hf_logits(model, tokens), ours) <= HF_TOL
    assert max_diff(jax_forward(cfg, params, tokens).logits, ours) <= HF_TOL


# -- nanoGPT ---------------------------------------------------------------------

def nanogpt_checkpoint(args: dict, seed: int = 0) -> dict:
    """A ckpt.pt as nanoGPT's train.py saves it, from a torch.compile'd model
    without flash attention: "_orig_mod." keys, the attn.bias mask buffer,
    lm_head.weight tied to wte, optimizer state beside the model."""
    g = torch.Generator().manual_seed(seed)
    C, L, V, T, bias = args["n_embd"], args["n_layer"], args["vocab_size"], args["block_size"], args["bias"]

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": w(V, C), "transformer.wpe.weight": w(T, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1 + w(C, std=0.1)
        sd[p + "attn.c_attn.weight"] = w(3 * C, C)
        sd[p + "attn.c_proj.weight"] = w(C, C)
        sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[p + "ln_2.weight"] = 1 + w(C, std=0.1)
        sd[p + "mlp.c_fc.weight"] = w(4 * C, C)
        sd[p + "mlp.c_proj.weight"] = w(C, 4 * C)
        if bias:
            for name, n in [("ln_1", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C), ("ln_2", C),
                            ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)]:
                sd[p + name + ".bias"] = w(n, std=0.1)
    sd["transformer.ln_f.weight"] = 1 + w(C, std=0.1)
    if bias:
        sd["transformer.ln_f.bias"] = w(C, std=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    return {"model": {"_orig_mod." + k: v for k, v in sd.items()}, "optimizer": opt.state_dict(),
            "model_args": args, "iter_num": 100, "best_val_loss": torch.tensor(1.5),
            "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "shakespeare_char"}}


def nanogpt_forward(sd: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT model.py's forward (eval), written out: (B, T) -> (B, T, V)."""
    B, T = idx.shape
    C, H = args["n_embd"], args["n_head"]

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]  # (B, T, C)
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) / (C // H) ** 0.5
        att = att.masked_fill(sd[p + "attn.bias"][:, :, :T, :T] == 0, float("-inf")).softmax(dim=-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_imports_and_matches(bias, tmp_path):
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, bias=bias, vocab_size=70, dropout=0.0)
    ckpt = nanogpt_checkpoint(args)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    convert(tmp_path / "ckpt.pt", tmp_path / "jax")
    cfg, tmodel, params = both_twins(tmp_path / "jax")
    assert (cfg.mlp, cfg.norm_bias, cfg.qkv_bias, cfg.tie_embeddings) == ("gelu", bias, bias, True)
    tokens = tokens_for(cfg, length=16)
    sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    with torch.no_grad():
        expected = nanogpt_forward(sd, args, torch.as_tensor(tokens).long()).numpy()
    assert max_diff(torch_forward(tmodel, tokens).logits, expected) <= HF_TOL
    assert max_diff(jax_forward(cfg, params, tokens).logits, expected) <= HF_TOL


# -- what each format can hold ----------------------------------------------------

DEFAULT_RUN = ModelConfig(vocab_size=75, context_length=32, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                          position="learned", qkv_bias=False, out_bias=False, mlp="relu", mlp_bias=False,
                          tie_embeddings=True)  # configs/default.toml's architecture, smaller


@pytest.mark.parametrize("cfg,arch", [
    (DEFAULT_RUN, "gpt2"),
    (DEFAULT_RUN.replace(mlp="gelu", norm_bias=False), "gpt2"),  # nanoGPT's bias=False
    (OURS["llama_fused_qkv"].replace(qkv_bias=True), "llama"),  # q/k/v biases without an o_proj one
], ids=["default-run", "nanogpt-no-bias", "llama-qkv-bias-only"])
def test_missing_biases_export_as_zeros(cfg, arch, tmp_path):
    """A missing bias is a zero bias: bias-free models (the default run's,
    nanoGPT's bias=False) export to GPT-2, and transformers computes our
    logits and greedy continuation."""
    tmodel, params = twins(cfg)
    torch_pt.save(tmp_path / "model.pt", {"config": cfg.to_dict()}, tm.state_arrays(tmodel).items())
    convert(tmp_path / "model.pt", tmp_path / "hf", arch=arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = tokens_for(cfg, length=12)
    assert max_diff(hf_logits(model, tokens), torch_forward(tmodel, tokens).logits) <= HF_TOL
    prompt = tokens[:1, :4]
    ours = np.asarray(jgen.generate(params, cfg, prompt, max_new_tokens=16, temperature=0.0))
    with torch.no_grad():
        theirs = model.generate(torch.as_tensor(prompt).long(), max_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    assert np.array_equal(theirs[:, 4:].numpy(), ours)


def test_special_tokens_are_declared_for_transformers(tmp_path):
    """A BPE run's [eos] / [pad] become HF's eos / pad: config.json,
    generation_config.json and tokenizer_config.json name them, so
    AutoTokenizer and generate() know where to stop; ids for text with
    leading spaces, newlines and unicode equal ours."""
    from gptcore.tokenizer import Tokenizer
    from jaxgpt.checkpoint import save_model
    text = "To be, or not to be: that is the question.\n Whether 'tis nobler — in the mind\n" * 50
    tok = Tokenizer.train_bpe(text, 300)
    tok.save(tmp_path / "tokenizer.json")
    cfg = OURS["llama_fused_qkv"].replace(vocab_size=tok.vocab_size)
    save_model(tmp_path / "jax", twins(cfg)[1], cfg, tmp_path / "tokenizer.json")
    convert(tmp_path / "jax", tmp_path / "hf", dst_format="hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.eos_token, hf_tok.eos_token_id, hf_tok.pad_token_id) == ("[eos]", tok.eos_id, tok.pad_id)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert config.eos_token_id == generation.eos_token_id == tok.eos_id
    assert config.pad_token_id == generation.pad_token_id == tok.pad_id
    for sample in ("To be, or not", "\n Whether 'tis nobler", "— in the mind\n"):
        assert hf_tok(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)


def test_generate_clis_take_a_hugging_face_folder(tmp_path, capsys):
    """--checkpoint HF_DIR: both twins convert it in memory and generate the
    greedy text transformers generates."""
    import jaxgpt.generate as jg
    import torchgpt.generate as tg
    from gptcore.tokenizer import Tokenizer
    tok = Tokenizer.train_char("abcdefgh ")
    model = hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    argv = ["--checkpoint", str(tmp_path / "hf"), "--prompt", "abc", "--max-new-tokens", "12", "--temperature", "0"]
    outputs = []
    for main in (jg.main, tg.main):
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out)
    prompt = torch.as_tensor([tok.encode("abc")])
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    expected = "abc" + tok.decode(ids[0, 3:].tolist()) + "\n"
    assert outputs[0] == outputs[1] == expected


def test_nanogpt_meta_pkl_brings_the_vocabulary(tmp_path, capsys):
    """nanoGPT's layout, out/ckpt.pt beside data/<dataset>/meta.pkl: the
    converted directory gets the character vocabulary, and both generate CLIs
    continue a prompt as nanoGPT's own model does greedily. A meta.pkl that
    would run code is refused in one line, and runs nothing."""
    import os
    import pickle

    import jaxgpt.generate as jg
    import torchgpt.generate as tg
    from jaxgpt.convert import main as convert_main
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, bias=False, vocab_size=len(chars), dropout=0.0)
    ckpt = nanogpt_checkpoint(args) | {"config": {"dataset": "shakespeare_char"}}
    (tmp_path / "out").mkdir()
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    data = tmp_path / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    convert(tmp_path / "out" / "ckpt.pt", tmp_path / "jax")
    sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    ids = [chars.index(c) for c in "First"]
    for _ in range(8):  # nanoGPT's greedy continuation
        with torch.no_grad():
            ids.append(int(nanogpt_forward(sd, args, torch.tensor([ids]))[0, -1].argmax()))
    expected = "".join(chars[i] for i in ids) + "\n"
    argv = ["--checkpoint", str(tmp_path / "jax"), "--prompt", "First", "--max-new-tokens", "8", "--temperature", "0"]
    for main in (jg.main, tg.main):
        capsys.readouterr()
        assert main(argv) == 0
        assert capsys.readouterr().out == expected

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    (data / "meta.pkl").write_bytes(pickle.dumps(Hostile()))
    capsys.readouterr()
    assert convert_main([str(tmp_path / "out" / "ckpt.pt"), str(tmp_path / "jax2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "meta.pkl" in err and err.count("\n") == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "jax2").exists()
