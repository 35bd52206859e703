"""Checkpoint conversion: key maps, bitwise round trips through every format,
bf16, refusals with one-line errors, and a .pt carrying a malicious pickle."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import torchgpt.model as tm
from gptcore.config import ModelConfig
from gptcore.formats import FormatError, safetensors_io, torch_pt
from gptcore.formats.keymap import (
    FUSE_QKV,
    SPLIT_QKV,
    STACK_EXPERTS,
    STACK_GATE_UP,
    TRANSPOSE,
    chain,
)
from gptcore.formats.state import state_shapes
from gptcore.presets import load_model_config, preset_names
from jaxgpt.convert import convert, main

REPO = Path(__file__).resolve().parents[1]
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Presets whose architecture Hugging Face GPT-2 / Llama / Mixtral can express.
# what an HF architecture holds exactly (missing biases exported as zeros: the default run, nanoGPT, seed 001)
HF_EXPRESSIBLE = {"debug", "default", "gpt2", "gpt2_350m", "llama", "llama2_7b", "mixtral", "mixtral_8x7b",
                  "nanogpt_shakespeare_char", "seed001_mini"}


def tiny(cfg: ModelConfig) -> ModelConfig:
    """A preset at toy size with its head layout (MHA / GQA, head_dim != d_model / n_heads) and choices kept."""
    kv = 4 if cfg.n_kv_heads == cfg.n_heads else 2
    head_dim = 8 if cfg.head_dim * cfg.n_heads == cfg.d_model else 6
    moe = dict(n_experts=4, top_k=min(cfg.top_k, 3)) if cfg.is_moe else {}
    return cfg.replace(vocab_size=40, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv,
                       head_dim=head_dim, d_ff=24, **moe)


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every weight random (no 1s and 0s left from init), float32."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in state_shapes(cfg).items()}


def save_pt(path, cfg, state):
    torch_pt.save(path, {"config": cfg.to_dict()}, state.items())
    return path


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), np.asarray(b[k]).view(np.uint8)), k


def read_pt(path) -> dict:
    return torch_pt.load(path)["model"]


def run_main(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# -- our names, key maps --------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_state_shapes_are_torchgpts_state_dict(name):
    cfg = tiny(load_model_config(name))
    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in tm.GPT(cfg).state_dict().items()}


def test_transforms_invert_exactly():
    cfg = ModelConfig(d_model=8, n_heads=4, n_kv_heads=2, head_dim=3, d_ff=5, n_experts=3, top_k=2)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(n, 8)).astype(np.float32) for n in (12, 6, 6))
    for t, xs in [(FUSE_QKV, [q, k, v]), (chain(FUSE_QKV, TRANSPOSE), [q, k, v]),
                  (SPLIT_QKV, [np.concatenate([q, k, v])]), (TRANSPOSE, [q]),
                  (STACK_EXPERTS, [rng.normal(size=(8, 5)) for _ in range(3)]),
                  (STACK_GATE_UP, [rng.normal(size=(5, 8)) for _ in range(6)])]:
        back = t.inverse(t.forward(xs, cfg), cfg)
        assert len(back) == len(xs) and all(np.array_equal(a, b) for a, b in zip(xs, back)), t.name
    fused = FUSE_QKV.forward([q, k, v], cfg)[0]
    assert np.array_equal(fused[:12], q) and np.array_equal(fused[12:18], k)  # [q | k | v]
    gate_up = STACK_GATE_UP.forward([np.full((5, 8), i) for i in range(6)], cfg)[0]
    assert gate_up.shape == (3, 10, 8) and gate_up[1, 0, 0] == 1 and gate_up[1, 5, 0] == 4  # [gate_e | up_e]


def test_safetensors_writer_matches_the_library(tmp_path):
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones((3,), ml_dtypes.bfloat16),
         "z": np.arange(5, dtype=np.int64)}
    safetensors_io.write(tmp_path / "a.safetensors", a.items(), {"k": "v"})
    back = safetensors.numpy.load_file(tmp_path / "a.safetensors")
    assert_same(a, {k: back[k] for k in a})
    assert safetensors_io.SafetensorsFile(tmp_path / "a.safetensors").metadata == {"k": "v"}


# -- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_round_trip_every_format_bitwise(name, tmp_path):
    """.pt -> .safetensors -> jaxgpt dir -> .pt, and .pt -> HF -> .safetensors
    where HF can express the preset: fp32 bit-identical, config unchanged,
    and transformers' logits of the HF export equal ours (1e-4 relative to
    the largest logit: these weights are N(0, 0.5), logits in the tens)."""
    cfg = tiny(load_model_config(name))
    state = random_state(cfg)
    save_pt(tmp_path / "a.pt", cfg, state)
    convert(tmp_path / "a.pt", tmp_path / "b.safetensors")
    convert(tmp_path / "b.safetensors", tmp_path / "c")
    convert(tmp_path / "c", tmp_path / "d.pt")
    assert_same(state, read_pt(tmp_path / "d.pt"))
    assert ModelConfig.from_dict(torch_pt.load(tmp_path / "d.pt")["config"]) == cfg
    if name not in HF_EXPRESSIBLE:
        with pytest.raises(FormatError, match=r"cannot express \w+="):
            convert(tmp_path / "a.pt", tmp_path / "hf", dst_format="hf")
        assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.converting").exists()
        return
    convert(tmp_path / "a.pt", tmp_path / "hf", dst_format="hf")
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context_length)))
    with torch.no_grad():  # transformers computes the function the preset's model computes
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits.numpy()
        ours = tm.load_state_arrays(state, cfg).eval()(ids).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())
    convert(tmp_path / "hf", tmp_path / "e.pt")
    back, back_cfg = read_pt(tmp_path / "e.pt"), ModelConfig.from_dict(torch_pt.load(tmp_path / "e.pt")["config"])
    if back_cfg.qkv_fused != cfg.qkv_fused:  # HF Llama keeps q, k, v apart: fuse them back
        for i in range(cfg.n_layers):
            parts = [back.pop(f"blocks.{i}.attn.{p}_proj.weight") for p in "qkv"]
            back[f"blocks.{i}.attn.qkv_proj.weight"] = np.concatenate(parts)
        back_cfg = back_cfg.replace(qkv_fused=cfg.qkv_fused)
    added = set(back) - set(state)  # the zero biases of a bias-free model, and nothing else
    assert set(state) <= set(back) and all(k.endswith("bias") and not back[k].any() for k in added)
    assert_same(state, {k: back[k] for k in state})
    architecture = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "position",
                    "rope_base", "mlp", "norm", "norm_eps", "n_experts", "top_k", "tie_embeddings")
    assert all(getattr(back_cfg, f) == getattr(cfg, f) for f in architecture)
    assert back_cfg.qkv_bias == cfg.qkv_bias or (not cfg.qkv_bias and added)


def test_bf16_stays_bf16(tmp_path):
    cfg = tiny(load_model_config("llama"))
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_state(cfg).items()}
    save_pt(tmp_path / "a.pt", cfg, state)
    assert torch.load(tmp_path / "a.pt", weights_only=True)["model"]["tok_emb.weight"].dtype == torch.bfloat16
    convert(tmp_path / "a.pt", tmp_path / "b.safetensors")
    convert(tmp_path / "b.safetensors", tmp_path / "hf", dst_format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safetensors.safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    convert(tmp_path / "hf", tmp_path / "c.safetensors")
    convert(tmp_path / "c.safetensors", tmp_path / "d.pt")
    assert_same(state, read_pt(tmp_path / "d.pt"))


def test_mixtral_fused_expert_layout_imports(tmp_path):
    """transformers 5 names experts mlp.experts.gate_up_proj (E, 2F, C) / down_proj
    (E, C, F) in memory; a file in that layout imports like save_pretrained's
    per-expert w1/w2/w3 one, bit for bit."""
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3)
    model = transformers.MixtralForCausalLM(hf_cfg)
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
    model.save_pretrained(tmp_path / "legacy")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                tmp_path / "fused" / "model.safetensors", {"format": "pt"})
    convert(tmp_path / "legacy", tmp_path / "a.pt")
    convert(tmp_path / "fused", tmp_path / "b.pt")
    assert_same(read_pt(tmp_path / "a.pt"), read_pt(tmp_path / "b.pt"))
    gate_up = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert np.array_equal(read_pt(tmp_path / "a.pt")["blocks.1.mlp.experts.2.up.weight"], gate_up[2, 24:].numpy())


def test_tokenizer_travels_with_hf_directories(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxgpt.checkpoint import save_model
    from jaxgpt.model import load_state_arrays
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = tiny(load_model_config("llama"))
    save_model(tmp_path / "jax", load_state_arrays(random_state(cfg), cfg), cfg, tmp_path / "tokenizer.json")
    convert(tmp_path / "jax", tmp_path / "hf", dst_format="hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("a b a")["input_ids"] == [1, 2, 1]
    convert(tmp_path / "hf", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


def test_gpt2_files_without_the_transformer_prefix_import(tmp_path):
    """Older GPT-2 files name weights h.0..., wte.weight, with attn.bias buffers."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16,
                                                                 n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "new")
    old = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    old |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 16, 16)) for i in range(2)}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    safetensors.torch.save_file(old, tmp_path / "old" / "model.safetensors", {"format": "pt"})
    convert(tmp_path / "new", tmp_path / "a.pt")
    convert(tmp_path / "old", tmp_path / "b.pt")
    assert_same(read_pt(tmp_path / "a.pt"), read_pt(tmp_path / "b.pt"))


# -- refusals ------------------------------------------------------------------------------

LLAMA = tiny(load_model_config("llama"))
GPT2 = tiny(load_model_config("gpt2"))
MIXTRAL = tiny(load_model_config("mixtral"))


@pytest.mark.parametrize("cfg, arch, field", [
    (LLAMA.replace(norm_placement="post"), "llama", "norm_placement"),
    (LLAMA.replace(mlp="gelu"), "llama", "mlp"),
    (LLAMA.replace(position="learned"), "llama", "position"),
    (LLAMA.replace(lm_head_bias=True), "llama", "lm_head_bias"),
    (MIXTRAL, "gpt2", "position"),
    (GPT2.replace(n_experts=2), "gpt2", "n_experts"),
    (GPT2.replace(tie_embeddings=False), "gpt2", "tie_embeddings"),
    (GPT2.replace(ffn_residual=False), "gpt2", "ffn_residual"),
    (MIXTRAL.replace(router_bias=True), "mixtral", "router_bias"),
    (MIXTRAL.replace(shared_expert=True), "mixtral", "shared_expert"),
    (MIXTRAL.replace(mlp_bias=True), "mixtral", "mlp_bias"),
    (LLAMA, "mixtral", "n_experts"),
])
def test_inexpressible_configs_give_one_line_and_no_output(cfg, arch, field, tmp_path, capsys):
    save_pt(tmp_path / "a.pt", cfg, random_state(cfg))
    code, err = run_main([tmp_path / "a.pt", tmp_path / "hf", "--arch", arch], capsys)
    assert code == 2 and err.startswith(f"error: cannot express {field}=") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_existing_destination_is_refused_unless_forced(tmp_path, capsys):
    save_pt(tmp_path / "a.pt", LLAMA, random_state(LLAMA))
    (tmp_path / "out.safetensors").write_text("mine")
    code, err = run_main([tmp_path / "a.pt", tmp_path / "out.safetensors"], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert (tmp_path / "out.safetensors").read_text() == "mine"
    assert run_main([tmp_path / "a.pt", tmp_path / "out.safetensors", "--force"], capsys)[0] == 0
    assert safetensors_io.SafetensorsFile(tmp_path / "out.safetensors").metadata["format"] == "pt"


def test_missing_unexpected_and_misshaped_weights_are_named(tmp_path, capsys):
    state = random_state(LLAMA)
    meta = {"config": json.dumps(LLAMA.to_dict())}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.mlp.up.weight"},
                    "missing weight 'blocks.1.mlp.up.weight'"),
        "unexpected": (state | {"blocks.0.extra": state["norm_f.weight"]}, "unexpected weight 'blocks.0.extra'"),
        "misshaped": (state | {"norm_f.weight": np.ones(7, np.float32)},
                      "weight 'norm_f.weight' has shape (7,), the config expects (32,)"),
    }
    for name, (tensors, message) in cases.items():
        safetensors_io.write(tmp_path / f"{name}.safetensors", tensors.items(), meta)
        code, err = run_main([tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pt"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    # foreign names: an HF directory with an extra and a mis-shaped weight
    save_pt(tmp_path / "a.pt", LLAMA, state)
    convert(tmp_path / "a.pt", tmp_path / "hf", dst_format="hf")
    weights = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    safetensors.numpy.save_file(weights | {"model.layers.0.mlp.extra.weight": weights["model.norm.weight"]},
                                tmp_path / "hf" / "model.safetensors", {"format": "pt"})
    code, err = run_main([tmp_path / "hf", tmp_path / "x.pt"], capsys)
    assert code == 2 and "unexpected weight 'model.layers.0.mlp.extra.weight'" in err
    weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"]
    safetensors.numpy.save_file(weights, tmp_path / "hf" / "model.safetensors", {"format": "pt"})
    code, err = run_main([tmp_path / "hf", tmp_path / "x.pt"], capsys)
    assert code == 2 and "model.layers.1.self_attn.k_proj.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / ".x.pt.converting").exists()
    del weights["lm_head.weight"]
    safetensors.numpy.save_file(weights, tmp_path / "hf" / "model.safetensors", {"format": "pt"})
    code, err = run_main([tmp_path / "hf", tmp_path / "x.pt"], capsys)
    assert code == 2 and "missing weight 'lm_head.weight'" in err


class Payload:
    """Unpickling this calls open(marker, "w"): creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_executes_nothing(tmp_path, capsys):
    state = {k: torch.from_numpy(v) for k, v in random_state(LLAMA).items()}
    torch.save({"config": LLAMA.to_dict(), "model": state, "x": Payload(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:  # an old-style (non-zip) pickle too
        pickle.dump({"model_args": {}, "model": Payload(tmp_path / "pwned")}, f, protocol=2)
    for src in ("evil.pt", "evil.pkl"):
        code, err = run_main([tmp_path / src, tmp_path / "out.safetensors", "--from", "pt"], capsys)
        assert code == 2 and "weights-only" in err and err.count("\n") == 1, err
        assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert (tmp_path / "pwned").exists()


def test_cli_errors_and_module_entry(tmp_path, capsys):
    code, err = run_main([tmp_path / "nope.pt", tmp_path / "out.pt"], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'nope.pt'} does not exist\n"
    (tmp_path / "weights.npz").write_bytes(b"")
    code, err = run_main([tmp_path / "weights.npz", tmp_path / "out.pt"], capsys)
    assert code == 2 and "use --from" in err
    save_pt(tmp_path / "a.pt", LLAMA, random_state(LLAMA))
    code, err = run_main([tmp_path / "a.pt", tmp_path / "out.pt", "--arch", "llama", "--to", "pt"], capsys)
    assert code == 2 and "--arch" in err
    done = subprocess.run([sys.executable, "-m", "jaxgpt.convert", tmp_path / "a.pt", tmp_path / "b.safetensors"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and (tmp_path / "b.safetensors").is_file(), done.stderr
    assert done.stdout == f"wrote {tmp_path / 'b.safetensors'}\n" and done.stderr == ""


def test_a_run_directory_converts_into_a_new_folder(tmp_path):
    """convert takes a training run directory (its model/, as the generate
    CLIs do) and creates the missing folders of a file destination; jaxgpt
    directories it writes are read by both twins without jax's params/."""
    import json

    import torchgpt.checkpoint as tckpt
    from jaxgpt.checkpoint import load_model, save_model
    from jaxgpt.model import load_state_arrays, state_arrays
    cfg = tiny(load_model_config("default").replace(vocab_size=64))
    state = random_state(cfg)
    run = tmp_path / "run"
    save_model(run / "model", load_state_arrays(state, cfg), cfg)
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": {}, "data": {}}))
    convert(run, tmp_path / "new" / "folder" / "model.pt")
    assert_same(state, read_pt(tmp_path / "new" / "folder" / "model.pt"))
    convert(tmp_path / "new" / "folder" / "model.pt", tmp_path / "jax")
    assert not (tmp_path / "jax" / "params").exists()
    jax_state = state_arrays(load_model(tmp_path / "jax")[1])
    torch_state = tckpt.load_model(tmp_path / "jax")[1].state_dict()
    assert_same(state, {k: jax_state[k] for k in state})
    assert_same(state, {k: torch_state[k].numpy() for k in state})
