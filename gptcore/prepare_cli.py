"""The `python -m {jaxgpt,torchgpt}.prepare` command, framework-free:

    python -m jaxgpt.prepare [--config PRESET] data.corpus=SPEC [data.tokenizer=...] --out DIR

a corpus of any size as a token dataset (gptcore.prepare), encoded in
data.num_proc processes with bounded memory. The tokenizer is
data.tokenizer: a tokenizer.json path or gpt2, or char / bpe trained on the
corpus as it streams by (a first pass over the documents). With --config,
the tokenizer must fit the preset's model.vocab_size.
"""

from __future__ import annotations

from gptcore.cli import Parser, guarded
from gptcore.data import DataError
from gptcore.prepare import prepare
from gptcore.presets import build_section, load_sections
from gptcore.run import make_tokenizer


def run_cli(argv: list[str] | None, prog: str) -> int:
    """The prepare command; returns the exit status."""
    p = Parser(prog=prog, description="A corpus of any size as a token dataset (shards + manifest).")
    p.add_argument("--config", default=None, help="preset name or TOML file whose [data] table to start from")
    p.add_argument("--out", required=True, help="the token dataset directory to write")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per file (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value")
    args = p.parse_intermixed_args(argv)

    def body():
        tables = load_sections(args.config, args.overrides)
        data = build_section("data", tables.get("data", {}), str(args.config))
        if data.tokens:
            raise DataError("data.tokens names a prepared dataset: prepare takes data.corpus (and --out)")
        tokenizer = make_tokenizer(data)
        vocab = tables.get("model", {}).get("vocab_size")
        if isinstance(vocab, int) and tokenizer.vocab_size > vocab:  # "auto" takes the tokenizer's
            raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                            f"{vocab} ({args.config}): the ids would not fit its embedding")
        manifest = prepare(data.corpus, tokenizer, args.out, text_field=data.text_field,
                           cache_dir=data.cache_dir, val_fraction=data.val_fraction, val_split=data.val_split,
                           num_proc=data.num_proc or None, shard_tokens=args.shard_tokens, progress=True)
        splits = manifest["splits"]
        if not splits["val"]["tokens"]:
            raise DataError(f"nothing went to val ({manifest['documents']} documents, val_fraction "
                            f"{data.val_fraction}, val_split {data.val_split}): raise data.val_fraction")
        print(f"wrote {args.out}: {manifest['documents']:,} documents; " + ", ".join(
            f"{s} {v['tokens']:,} tokens" + (f" ({v['documents']:,} documents)" if v["documents"] is not None
                                             else "") for s, v in splits.items()))
    return guarded(body)

