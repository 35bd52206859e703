"""A model imported from Hugging Face fine-tunes on its own tokenizer: a
random-init Llama-shaped model saved by save_pretrained with a Llama-2-style
tokenizer (SentencePiece-like BPE: Metaspace, built with `tokenizers`) is
converted, a local jsonl is prepared with data.tokenizer=its tokenizer.json,
and jaxgpt.train fine-tunes it; the result converts back to a directory
transformers loads, whose tokenizer gives the ids the dataset holds."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from helpers import SHAKESPEARE
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import jaxgpt.prepare as jprepare
import jaxgpt.train as jtrain
from gptcore.shards import ShardedTokens
from gptcore.tokenizer import Tokenizer
from jaxgpt.convert import main as convert

DOCS = [d for d in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if d.strip()][:300]
DOCS[7] = "Unicode too: naïve café — “quoted” 汉字"


def llama_dir(root):
    """save_pretrained of a random-init Llama (GQA) and its Metaspace BPE tokenizer."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    fast.save_pretrained(root)
    return root


def test_an_hf_llama_fine_tunes_on_its_own_tokenizer(tmp_path, capsys):
    hf = llama_dir(tmp_path / "hf")
    tok = Tokenizer.load(hf / "tokenizer.json")
    assert tok.kind == "hf" and tok.eos_id == 2
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    assert convert([str(hf), str(tmp_path / "imported")]) == 0
    assert jprepare.main([f"data.corpus={tmp_path / 'docs.jsonl'}", f"data.tokenizer={hf / 'tokenizer.json'}",
                          "data.val_split=documents", "data.val_fraction=0.1", "--out", str(tmp_path / "ds")]) == 0

    ids = ShardedTokens(tmp_path / "ds", "train")
    ids = ids[np.arange(len(ids))].tolist()
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
    train_docs = [d for i, d in enumerate(DOCS) if (i + 1) % 10]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert len(ends) == len(train_docs)
    for doc, a, b in zip(train_docs[:20], [-1, *ends], ends):  # the ids transformers gives, the text back
        assert ids[a + 1:b] == hf_tok(doc, add_special_tokens=False)["input_ids"]
        assert hf_tok.decode(ids[a + 1:b]) == doc

    run = tmp_path / "tuned"
    assert jtrain.main(["--config", "debug", f"train.init_from={tmp_path / 'imported'}",
                        f"data.tokens={tmp_path / 'ds'}", f"train.out_dir={run}", "train.max_steps=30",
                        "train.lr=3e-3", "train.warmup_steps=2", "train.eval_interval=10", "train.eval_batches=2",
                        "train.batch_size=8", "train.sample_tokens=8"]) == 0
    val = [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val  # it learns the corpus in its own ids
    assert (run / "sample.txt").read_text().strip()

    assert convert([str(run / "model"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert isinstance(back, transformers.LlamaForCausalLM)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert again(DOCS[7], add_special_tokens=False)["input_ids"] == hf_tok(DOCS[7], add_special_tokens=False)[
        "input_ids"]
