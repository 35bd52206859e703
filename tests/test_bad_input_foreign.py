"""Bad input, second pass: what a hostile user tries beyond the first table
(tests/test_bad_input.py, whose user directory and checks this module
shares): numbers beyond 64 bits in TOML, devices as files, kernels the
machine lacks, model configs of the wrong JSON type from every format
(run directories, safetensors metadata, Hugging Face, nanoGPT), configs that
claim 10**8 layers, a resumed run whose config, tokenizer or corpus changed,
a new run into a directory of the user's files, and `convert --force` onto
things it did not write. Each case: one `error:` line, exit status 2, no
traceback, every file of the user's unchanged, no half-made run left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import test_bad_input
import torch
from test_bad_input import User, run_case, train_args

import jaxgpt.convert as convert
import jaxgpt.generate as jgen
import jaxgpt.train as jtrain
import torchgpt.generate as tgen
import torchgpt.model as tm
import torchgpt.train as ttrain
from gptcore.config import ModelConfig
from torchgpt.checkpoint import save_model as torch_save_model

user = test_bad_input.user  # its fixture: the user's directory, made again for this module


def scratch(u: User, name: str) -> Path:
    path = u.root / "copies" / name
    path.mkdir(parents=True)
    return path


def edited_json(u: User, src: Path, name: str, edit) -> Path:
    """A copy of the model directory src whose config.json is edit(config)."""
    dst = u.copy(src, name)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(cfg)))
    return dst


def llama_hf(u: User) -> Path:
    """A Llama-shaped model exported as a Hugging Face directory (made once)."""
    dst = u.root / "copies" / "llama_hf"
    if not dst.exists():
        cfg = ModelConfig(vocab_size=40, context_length=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                          d_ff=32, position="rope", qkv_fused=False, qkv_bias=False, out_bias=False, mlp="swiglu",
                          mlp_bias=False, norm="rmsnorm", norm_bias=False, tie_embeddings=False)
        torch_save_model(u.root / "copies" / "llama_src", tm.GPT(cfg), cfg)
        convert.convert(u.root / "copies" / "llama_src", dst, arch="llama")
    return dst


def hf_with(u: User, name: str, change) -> Path:
    return edited_json(u, llama_hf(u), name, lambda c: change if not isinstance(change, dict) else {**c, **change})


def safetensors_with_config(u: User, name: str, config: str) -> Path:
    tensors = safetensors.numpy.load_file(u.safetensors)
    path = u.root / "copies" / f"{name}.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt", "config": config})
    return path


def nanogpt_with(u: User, name: str, model_args) -> Path:
    path = u.root / "copies" / f"{name}.pt"
    torch.save({"model_args": model_args, "model": {"transformer.wte.weight": torch.zeros(4, 4)}}, path)
    return path


def resumable(u: User, name: str, edit=None) -> Path:
    """A copy of the user's finished run, its config.json edited."""
    run = u.copy(u.run, name)
    if edit is not None:
        tables = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(edit(tables)))
    return run


def permuted_tokenizer(u: User, name: str) -> Path:
    """The run with two ids of its tokenizer swapped: same vocabulary, other meanings."""
    run = resumable(u, name)
    tok = json.loads((run / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    (a, ia), (b, ib) = list(vocab.items())[3:5]
    vocab[a], vocab[b] = ib, ia
    (run / "tokenizer.json").write_text(json.dumps(tok))
    return run


def users_files(u: User) -> Path:
    """A directory of the user's own files with a run's names (but no config.json)."""
    d = scratch(u, "users_files")
    for name in ("tokenizer.json", "sample.txt", "loss.png", "data/tokens-00000.bin", "data/manifest.json"):
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(f"the user's {name}\n")
    return d


def with_tokenizer(u: User, name: str, make) -> Path:
    """A copy of the model directory whose tokenizer.json is make(path)'s doing."""
    d = u.copy(u.model, name)
    (d / "tokenizer.json").unlink()
    make(d / "tokenizer.json")
    return d


def sparse_file(u: User, name: str, size: int) -> Path:
    path = u.root / "copies" / name
    with open(path, "wb") as f:
        f.truncate(size)  # no blocks written: cheap at any size
    return path


def dir_holding(u: User, name: str) -> Path:
    """A folder of the user's with a model file and a note in it."""
    d = scratch(u, name)
    shutil.copyfile(u.pt, d / "model.pt")
    (d / "notes.txt").write_text("mine\n")
    return d


def to_toml_file(u: User, name: str, text: str) -> Path:
    path = u.root / "copies" / name
    path.write_text(text)
    return path


CASES = {
    # numbers and kernels
    "toml_integer_beyond_64_bits": (jtrain.main, lambda u, o: ["--config", to_toml_file(
        u, "big.toml", f"[train]\nseed = {10 ** 23}\n"), f"train.out_dir={o}"], "does not fit in 64 bits"),
    "cudnn_attention_without_a_gpu": (jtrain.main, lambda u, o: train_args(u, o, "train.attention_impl=cudnn"),
                                      "needs an NVIDIA GPU"),
    # files that are not files
    "corpus_dev_zero": (jtrain.main, lambda u, o: train_args(u, o, "data.corpus=/dev/zero"), "not a regular file"),
    "corpus_dev_urandom": (ttrain.main, lambda u, o: train_args(u, o, "data.corpus=/dev/urandom"),
                           "not a regular file"),
    "config_dev_zero": (jtrain.main, lambda u, o: ["--config", "/dev/zero", f"train.out_dir={o}"],
                        "no config file '/dev/zero.toml'"),
    "prompt_file_dev_zero": (jgen.main, lambda u, o: ["--checkpoint", u.model, "--prompt-file", "/dev/zero"],
                             "not a regular file"),
    "prompt_file_of_a_gigabyte": (tgen.main, lambda u, o: ["--checkpoint", u.model, "--prompt-file",
                                                           sparse_file(u, "huge_prompt.txt", 2**30)],
                                  "more than the 16,777,216 accepted"),
    "checkpoint_a_file_without_tokenizer": (jgen.main, lambda u, o: ["--checkpoint", safetensors_with_config(
        u, "no_tokenizer", json.dumps(json.loads((u.model / "config.json").read_text())["model"]))],
                                            "no tokenizer.json"),
    # model configs of the wrong JSON type, from every format
    "model_dir_config_model_a_list": (jgen.main, lambda u, o: ["--checkpoint", edited_json(
        u, u.model, "model_list", lambda c: {**c, "model": []})], "a JSON object of fields, not list"),
    "model_dir_config_model_an_int": (tgen.main, lambda u, o: ["--checkpoint", edited_json(
        u, u.model, "model_int", lambda c: {**c, "model": 3})], "a JSON object of fields, not int"),
    "resume_config_sections_not_objects": (jtrain.main, lambda u, o: train_args(u, resumable(
        u, "sections_list", lambda t: {**t, "model": [1]}), "--resume"), "a JSON object of sections"),
    "safetensors_config_a_list": (convert.main, lambda u, o: [safetensors_with_config(u, "cfg_list", "[1, 2]"),
                                                              o / "x.pt"], "not a JSON object"),
    "safetensors_config_a_string": (convert.main, lambda u, o: [safetensors_with_config(u, "cfg_str", '"abc"'),
                                                                o / "x.pt"], "not a JSON object"),
    "safetensors_config_of_1e8_layers": (convert.main, lambda u, o: [safetensors_with_config(
        u, "cfg_layers", json.dumps({**json.loads((u.model / "config.json").read_text())["model"],
                                     "n_layers": 10 ** 8})), o / "x.pt"], "100,000,000 layers"),
    "hf_zero_heads": (convert.main, lambda u, o: [hf_with(u, "hf_heads", {"num_attention_heads": 0}), o / "x"],
                      "n_heads: must be positive"),
    "hf_hidden_size_null": (tgen.main, lambda u, o: ["--checkpoint", hf_with(u, "hf_null", {"hidden_size": None})],
                            "d_model: expected int"),
    "hf_rms_norm_eps_text": (convert.main, lambda u, o: [hf_with(u, "hf_eps", {"rms_norm_eps": "abc"}), o / "x"],
                             "'abc'"),
    "hf_rope_parameters_text": (convert.main, lambda u, o: [hf_with(u, "hf_rope", {"rope_parameters": "x"}),
                                                            o / "x"], "rope_parameters='x' is not supported"),
    "hf_config_a_list": (convert.main, lambda u, o: [hf_with(u, "hf_list", [1]), o / "x"], "not a JSON object"),
    "hf_config_a_list_generate": (jgen.main, lambda u, o: ["--checkpoint", hf_with(u, "hf_list2", [1])],
                                  "not a jaxgpt model config"),
    "hf_1e8_layers": (jgen.main, lambda u, o: ["--checkpoint", hf_with(u, "hf_layers",
                                                                        {"num_hidden_layers": 10 ** 8})],
                      "100,000,000 layers"),
    "nanogpt_model_args_a_list": (convert.main, lambda u, o: [nanogpt_with(u, "nano_list", [1, 2]), o / "x"],
                                  "model_args is a list"),
    "nanogpt_dropout_text": (convert.main, lambda u, o: [nanogpt_with(u, "nano_dropout", dict(
        n_layer=1, n_head=2, n_embd=4, block_size=8, bias=True, vocab_size=4, dropout="abc")), o / "x"],
                             "dropout is 'abc'"),
    # a resumed run that changed
    "resume_config_changed": (jtrain.main, lambda u, o: train_args(u, resumable(
        u, "changed_mlp", lambda t: {**t, "model": {**t["model"], "mlp": "gelu"}}), "--resume"),
                              "the model changed since the run started (mlp 'relu' -> 'gelu')"),
    "resume_tokenizer_permuted": (ttrain.main, lambda u, o: train_args(u, permuted_tokenizer(u, "permuted"),
                                                                        "--resume"), "tokenizer.json changed"),
    "resume_corpus_changed": (jtrain.main, lambda u, o: train_args(
        u, resumable(u, "other_corpus"), "--resume", f"data.corpus={u.root / 'latin1_free.txt'}"),
        "the corpus changed since the run started"),
    # the user's files
    "new_run_into_the_users_files": (jtrain.main, lambda u, o: train_args(u, users_files(u)), "is not empty"),
    "force_onto_a_directory_holding_the_source": (convert.main, lambda u, o: [
        dir_holding(u, "src_in") / "model.pt", u.root / "copies" / "src_in", "--force"], "contains the source"),
    "force_onto_a_users_file": (convert.main, lambda u, o: [u.pt, u.file, "--force"], "not a model file"),
    "force_onto_a_directory_of_other_files": (convert.main, lambda u, o: [u.pt, u.run, "--force"],
                                              "holds files a conversion does not write"),
    "tokenizer_linked_outside_the_model": (convert.main, lambda u, o: [with_tokenizer(
        u, "linked_tok", lambda p: p.symlink_to(u.file)), o / "x.pt"], "outside the model directory"),
    "tokenizer_malformed": (convert.main, lambda u, o: [with_tokenizer(
        u, "bad_tok", lambda p: p.write_text('{"model": 1')), o / "x"], "not a valid tokenizer.json"),
}


@pytest.fixture(scope="module")
def more(user):
    """Files the cases above read besides the user's first set."""
    (user.root / "latin1_free.txt").write_text(user.corpus.read_text()[::-1])
    return user


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, more, capsys):
    assert run_case(CASES[name], more, more.root / "out2" / name, capsys) == 2


def test_a_tiny_temperature_samples_the_argmax_in_both_twins(user, capsys):
    """1e-44 used to overflow logits / temperature: inf in torch's
    multinomial, a row of NaN (token 0) in jax. Both now give greedy's text."""
    texts = {}
    for name, main in (("jax", jgen.main), ("torch", tgen.main)):
        for temperature in ("0", "1e-44"):
            capsys.readouterr()
            assert main(["--checkpoint", str(user.model), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                         "--temperature", temperature]) == 0
            texts[name, temperature] = capsys.readouterr().out
    assert len(set(texts.values())) == 1, texts


def test_generate_reads_a_model_file_with_its_config(user, tmp_path):
    """--checkpoint takes a .pt or .safetensors file as well as a directory:
    the same weights give the same logits."""
    from jaxgpt.checkpoint import load_model as jload
    from torchgpt.checkpoint import load_model as tload
    ids = np.arange(8, dtype=np.int64)[None]
    ref = tload(user.model)[1](torch.as_tensor(ids)).logits.detach().numpy()
    for path in (user.pt, user.safetensors):
        assert np.array_equal(tload(path)[1](torch.as_tensor(ids)).logits.detach().numpy(), ref)
        cfg, params, _ = jload(path)
        assert cfg == tload(user.model)[0] and len(params) > 0


def test_an_unexpected_failure_is_one_line_and_a_new_run_leaves_nothing(user, monkeypatch, capsys):
    """A bug (here: the first step raising) is one line naming the exception
    and where it was raised, exit 1; JAXGPT_DEBUG=1 shows the traceback. A
    new run that fails before its first checkpoint removes what it wrote, so
    the corrected command runs as it is."""
    from jaxgpt.engine import JaxEngine

    def broken(self, step, batch):
        raise ZeroDivisionError("the kind of thing a bug raises")
    monkeypatch.setattr(JaxEngine, "step", broken)
    out = user.root / "out2" / "unexpected"
    capsys.readouterr()
    assert jtrain.main(train_args(user, out)) == 1
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "it/s]" not in line]
    lines = [line for line in lines if line.strip()]  # the progress bar had started
    assert len(lines) == 1 and lines[0].startswith("error: internal error ZeroDivisionError at loop.py:"), lines
    assert "JAXGPT_DEBUG=1" in lines[0] and not out.exists()
    monkeypatch.setenv("JAXGPT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        jtrain.main(train_args(user, out))
    assert not out.exists()


def test_a_run_fingerprinted_before_token_datasets_resumes(user, capsys):
    """Runs started before corpora became token datasets recorded the sha256
    of the corpus text: --resume checks that text, then refuses other text."""
    import hashlib
    run = resumable(user, "old_fingerprint")
    fp = json.loads((run / "fingerprint.json").read_text())
    del fp["source_sha256"]
    fp["corpus_sha256"] = hashlib.sha256(user.corpus.read_text(encoding="utf-8").encode("utf-8")).hexdigest()
    (run / "fingerprint.json").write_text(json.dumps(fp))
    assert jtrain.main(train_args(user, run, "--resume", "train.max_steps=6")) == 0
    fp["corpus_sha256"] = "0" * 64
    (run / "fingerprint.json").write_text(json.dumps(fp))
    capsys.readouterr()
    assert jtrain.main(train_args(user, run, "--resume", "train.max_steps=8")) == 2
    assert "the corpus changed since the run started" in capsys.readouterr().err
