"""What travels with a converted model besides its weights: the tokenizer
inside .pt files and safetensors metadata, sharded safetensors with their
index (in and out), the Hugging Face cache layout, and --verify."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

import torchgpt.model as tm
from gptcore.config import ModelConfig
from gptcore.formats import convert as formats
from gptcore.tokenizer import Tokenizer
from jaxgpt.convert import convert, main
from torchgpt.checkpoint import load_model, save_model

TEXT = "To be, or not to be: that is the question.\n" * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init model with a trained byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("bridge")
    tok = Tokenizer.train_bpe(TEXT, 300)
    tok.save(root / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    return save_model(root / "model", tm.GPT(cfg), cfg, root / "tokenizer.json")


def logits(directory, ids=np.arange(12)[None]):
    import torch
    return load_model(directory)[1](torch.as_tensor(ids)).logits.detach().numpy()


def test_the_tokenizer_travels_through_pt_and_safetensors(model_dir, tmp_path, capsys):
    """jaxgpt -> .pt -> .safetensors -> jaxgpt keeps a tokenizer that generates."""
    pt = convert(model_dir, tmp_path / "m.pt")
    st = convert(pt, tmp_path / "m.safetensors")
    back = convert(st, tmp_path / "back")
    original = (model_dir / "tokenizer.json").read_text()
    assert (back / "tokenizer.json").read_text() == original
    assert np.array_equal(logits(back), logits(model_dir))
    import jaxgpt.generate as jgen
    for checkpoint in (back, pt, st):  # generate reads the files as they are, tokenizer included
        capsys.readouterr()
        assert jgen.main(["--checkpoint", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "8",
                          "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("To be")


def test_sharded_safetensors_out_and_in(model_dir, tmp_path):
    """--max-shard-size splits an HF export like save_pretrained (with the
    index); transformers loads it, and it converts back bit for bit."""
    assert main([str(model_dir), str(tmp_path / "hf"), "--to", "hf", "--max-shard-size", "20KB"]) == 0
    hf = tmp_path / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not (hf / "model.safetensors").exists()
    assert all((hf / s).stat().st_size <= 20_000 or len(_names(hf / s)) == 1 for s in shards)
    assert index["metadata"]["total_size"] == sum(_nbytes(hf / s) for s in shards)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    import torch
    ours = logits(model_dir)
    with torch.no_grad():
        theirs = model(torch.arange(12)[None]).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    back = convert(hf, tmp_path / "back")
    assert np.array_equal(logits(back), ours)


def _names(path: Path) -> list[str]:
    from gptcore.formats.safetensors_io import SafetensorsFile
    return list(SafetensorsFile(path))


def _nbytes(path: Path) -> int:
    from gptcore.formats.safetensors_io import SafetensorsFile
    f = SafetensorsFile(path)
    return sum(f[name].nbytes for name in f)


def test_a_hugging_face_cache_layout_imports(model_dir, tmp_path):
    """models--ORG--NAME/{blobs,refs,snapshots/HASH} as huggingface_hub
    writes it (every snapshot file a link into blobs/): the root or the
    snapshot converts, tokenizer included."""
    convert(model_dir, tmp_path / "hf", dst_format="hf")
    root = tmp_path / "hub" / "models--someone--tiny"
    snapshot = root / "snapshots" / "0123abcd"
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    for i, f in enumerate(sorted((tmp_path / "hf").iterdir())):
        blob = root / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    for src in (root, snapshot):
        out = convert(src, tmp_path / f"from_{src.name}")
        assert np.array_equal(logits(out), logits(model_dir))
        tok, original = (Tokenizer.load(d / "tokenizer.json") for d in (out, model_dir))
        assert [tok.encode(t) for t in TEXTS] == [original.encode(t) for t in TEXTS]


def test_verify_passes_an_exact_conversion_and_fails_a_corrupted_one(model_dir, tmp_path, capsys, monkeypatch):
    assert main([str(model_dir), str(tmp_path / "ok.safetensors"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference| 0" in out and "mean KL" in out, out
    write = formats.WRITERS["safetensors"]

    def corrupted(path, ckpt, arch=None):  # one weight scaled: the kind of bug --verify is for
        tensors = dict(ckpt.tensors.items())
        name = next(n for n in tensors if n.endswith("mlp.fc.weight") or n.endswith("mlp.up.weight"))
        tensors[name] = np.asarray(tensors[name]) * 1.5
        write(path, formats.Checkpoint(ckpt.cfg, tensors, ckpt.tokenizer), arch)
    monkeypatch.setitem(formats.WRITERS, "safetensors", corrupted)
    capsys.readouterr()
    assert main([str(model_dir), str(tmp_path / "bad.safetensors"), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --verify:") and err.count("\n") == 1, err


TEXTS = ["To be", " To be", "  two spaces", "\nafter a newline", "café ☃ über\n\nend ", " ", "question"]


def test_transformers_encodes_every_text_as_we_do(model_dir, tmp_path):
    """A byte-level BPE with a prefix space: HF's own flag skips the space
    for text that already starts with one (" To be" and "To be" would
    collide), so the export says it as a Prepend normalizer and a Strip
    decoder. AutoTokenizer then gives our ids and our text for every text,
    and the exported file reads back as the same tokenizer."""
    hf = convert(model_dir, tmp_path / "hf", dst_format="hf")
    ours = Tokenizer.load(model_dir / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    back = Tokenizer.load(convert(hf, tmp_path / "back") / "tokenizer.json")
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == text == ours.decode(ids)
        assert back.encode(text) == ids and back.encode(text, start=False) == ours.encode(text, start=False)
    assert len({tuple(ours.encode(t)) for t in TEXTS}) == len(TEXTS)  # injective: " To be" is not "To be"
