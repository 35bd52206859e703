"""Hugging Face -> jaxgpt -> Hugging Face, as a user of transformers sees it:
random-init GPT-2, Llama (GQA) and Mixtral models saved by save_pretrained
with a tokenizer built by `tokenizers` come back as directories that
transformers loads without a warning, with every field of the source
config.json present and equal, a tokenizer with the same special tokens,
and greedy generate() stopping at eos at the same step as jaxgpt.generate."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

import jaxgpt.generate as jgen
from gptcore.tokenizer import Tokenizer
from jaxgpt.checkpoint import load_model
from jaxgpt.convert import convert

V = 96
CONFIGS = {
    "gpt2": (lambda ids: transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, **ids), "<|endoftext|>", None),
    "llama_gqa": (lambda ids: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5, **ids),
        "</s>", "<s>"),
    "mixtral": (lambda ids: transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, **ids),
        "</s>", "<s>"),
}
PROMPT = [5, 17, 9]
STEPS = 24


def tokenizer_with(eos: str, eos_id: int, bos: str | None, pad_id: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built with `tokenizers` whose special tokens
    sit at the given ids (eos where the model's greedy text goes)."""
    vocab = {f"w{i}": i for i in range(V)}
    named = {eos_id: eos, pad_id: "<pad>", **({1: bos} if bos else {})}
    vocab = {named.get(i, f"w{i}"): i for i in range(V)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(named.values()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>",
                                                **({"bos_token": bos} if bos else {}))


def greedy_eos(model) -> int:
    """The token the model's greedy continuation emits last for the first
    time (after step 0): as eos, generation must stop exactly there."""
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    fresh = [step for step in range(1, STEPS) if out[step] not in out[:step] and out[step] not in (0, 1)]
    if fresh:
        return out[fresh[-1]]
    raise AssertionError(f"no fresh token in the greedy text {out}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_jaxgpt_to_hf(name, tmp_path, caplog):
    make, eos, bos = CONFIGS[name]
    torch.manual_seed(0)
    probe = transformers.AutoModelForCausalLM.from_config(make({})).eval()
    with torch.no_grad():  # weights far from init's 0.02, so the greedy text wanders instead of repeating
        for p in probe.parameters():
            p.add_(0.3 * torch.randn_like(p))
    eos_id = greedy_eos(probe)
    pad_id = next(i for i in range(2, V) if i != eos_id)
    ids = {"eos_token_id": eos_id, "pad_token_id": pad_id, **({"bos_token_id": 1} if bos else {})}
    model = transformers.AutoModelForCausalLM.from_config(make(ids)).eval()
    model.load_state_dict(probe.state_dict())
    model.save_pretrained(tmp_path / "src")
    tokenizer_with(eos, eos_id, bos, pad_id).save_pretrained(tmp_path / "src")

    convert(tmp_path / "src", tmp_path / "jax")
    convert(tmp_path / "jax", tmp_path / "back", dst_format="hf")

    source = json.loads((tmp_path / "src" / "config.json").read_text())
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in source.items():
        assert key in back and back[key] == value, (key, value, back.get(key))

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformers.logging.set_verbosity_warning()
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert not [str(w.message) for w in caught] and not caplog.records, (caught, caplog.text)
    src_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "src")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        src_tok.bos_token_id, src_tok.eos_token_id, src_tok.pad_token_id)
    assert (tok.eos_token_id, tok.pad_token_id) == (eos_id, pad_id)

    with torch.no_grad():
        hf_out = loaded.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False)[0, len(PROMPT):]
    hf_out = hf_out.tolist()
    assert hf_out[-1] == eos_id and eos_id not in hf_out[:-1]  # stopped at eos, at the step greedy reaches it

    cfg, params, tokenizer_file = load_model(tmp_path / "jax")
    ours = Tokenizer.load(tokenizer_file)
    assert ours.eos_id == eos_id
    chunks = jgen.stream(params, cfg, PROMPT, max_new_tokens=STEPS, temperature=0.0, eos_id=ours.eos_id)
    jax_out = [t for chunk in chunks for t in chunk]
    assert jax_out == hf_out
    assert np.array_equal(np.asarray(jax_out), np.asarray(hf_out))
