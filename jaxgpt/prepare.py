"""`python -m jaxgpt.prepare [--config PRESET] data.corpus=SPEC [data.tokenizer=...] --out DIR`:
a corpus of any size as a token dataset (shards + manifest, gptcore.prepare),
encoded in data.num_proc processes with bounded memory. The tokenizer is
data.tokenizer: a tokenizer.json path or gpt2, or char / bpe trained on the
corpus as it streams by (a first pass over the documents).
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptcore.cli import Parser, guarded
from gptcore.corpus import download_gpt2_tokenizer
from gptcore.data import DataError
from gptcore.prepare import documents, prepare
from gptcore.presets import build_section, load_sections
from gptcore.tokenizer import Tokenizer


def tokenizer_for(data) -> Tokenizer:
    """data.tokenizer: a file (or gpt2's), or trained on the streamed corpus."""
    if data.tokenizer == "gpt2":
        return Tokenizer.load(download_gpt2_tokenizer(Path(data.cache_dir).expanduser()))
    if data.tokenizer == "char":
        return Tokenizer.train_char(documents(data.corpus, data.text_field), special_tokens=["[eos]"])
    if data.tokenizer == "bpe":
        return Tokenizer.train_bpe(documents(data.corpus, data.text_field), data.bpe_vocab_size)
    return Tokenizer.load(Path(data.tokenizer).expanduser())


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m jaxgpt.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="preset name or TOML file whose [data] table to start from")
    p.add_argument("--out", required=True, help="the token dataset directory to write")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    args = p.parse_intermixed_args(argv)

    def body():
        tables = load_sections(args.config, args.overrides)
        data = build_section("data", tables.get("data", {}), str(args.config))
        tokenizer = tokenizer_for(data)
        manifest = prepare(data.corpus, tokenizer, args.out, text_field=data.text_field,
                           val_fraction=data.val_fraction, num_proc=data.num_proc or None, progress=True)
        splits = manifest["splits"]
        if not splits["val"]["documents"]:
            raise DataError(f"no document went to val ({splits['train']['documents']} documents, val_fraction "
                            f"{data.val_fraction}): raise data.val_fraction or add documents")
        print(f"wrote {args.out}: " + ", ".join(
            f"{s} {sum(x['tokens'] for x in v['shards']):,} tokens in {v['documents']:,} documents"
            for s, v in splits.items()))
    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
