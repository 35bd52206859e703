"""Encoding a corpus into tokens: jaxgpt.prepare against the two obvious ways.

    python benchmarks/bench_prepare.py                 # the README table: ~500 MB and ~1 GB corpora
    python benchmarks/bench_prepare.py --mb 50 100     # quick look

Each corpus is generated (tiny Shakespeare's paragraphs, shuffled, as half
jsonl files and half .txt files of one document each) under a temporary
directory; the tokenizer is a byte-level BPE of 8192 tokens trained on tiny
Shakespeare. Three engines, each in a fresh process, on the same corpus:

- prepare:   gptcore.prepare.prepare with one worker process per core;
- 1 thread:  the same tokenizer's `encode` on 1 MB chunks of every file's text,
             TOKENIZERS_PARALLELISM=false, ids appended to one file;
- naive:     read every document into memory, one multithreaded `encode_batch`.

Reported: MB/s of text, tokens/s, and peak RSS (the engine's own process;
for prepare also its largest worker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

ENGINES = {
    "prepare": """
from gptcore.prepare import prepare
m = prepare(CORPUS, TOK, OUT, val_fraction=0.001, num_proc=os.cpu_count())
n = sum(f["tokens"] for f in m["files"])
""",
    "1 thread": """
from gptcore.documents import documents
n = 0
with open(OUT + ".bin", "wb") as out:
    for doc in documents(CORPUS):
        for i in range(0, len(doc), 1 << 20):
            ids = TOK.encode(doc[i:i + (1 << 20)], start=i == 0)
            np.asarray(ids, np.uint16).tofile(out)
            n += len(ids)
""",
    "naive": """
from gptcore.documents import documents
docs = list(documents(CORPUS))
encoded = TOK.encode_batch(docs)
n = sum(len(ids) for ids in encoded)
np.concatenate([np.asarray(ids, np.uint16) for ids in encoded]).tofile(OUT + ".bin")
""",
}

CHILD = """
import os, resource, sys, time
if {single!r}:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
import numpy as np
from gptcore.tokenizer import Tokenizer
CORPUS, OUT = {corpus!r}, {out!r}
TOK = Tokenizer.load({tokenizer!r})
t0 = time.perf_counter()
{body}
seconds = time.perf_counter() - t0
print(seconds, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def make_corpus(root: Path, megabytes: int) -> int:
    """Half jsonl (documents of ~10 paragraphs), half .txt files of ~1 MB; returns its bytes."""
    paras = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(0)
    root.mkdir(parents=True)
    target, written, i = megabytes * 10**6, 0, 0
    while written < target:
        if i % 2 == 0:
            with open(root / f"part{i:04d}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(100):
                    line = json.dumps({"text": "\n\n".join(rng.choices(paras, k=10))}) + "\n"
                    f.write(line)
                    written += len(line.encode())
        else:
            text = "\n\n".join(rng.choices(paras, k=4000))
            (root / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
            written += len(text.encode())
        i += 1
    return written


def run(engine: str, corpus: Path, tokenizer: Path, out: Path) -> tuple[float, int, int, int]:
    code = CHILD.format(single=engine == "1 thread", corpus=str(corpus), out=str(out), tokenizer=str(tokenizer),
                        body=ENGINES[engine])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{engine} failed: {proc.stderr[-2000:]}")
    seconds, n, rss, child = proc.stdout.split()[-4:]
    return float(seconds), int(n), int(rss), int(child)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, nargs="+", default=[500, 1000], help="corpus sizes, MB")
    p.add_argument("--naive-max-mb", type=int, default=200,
                   help="run the naive engine up to this size only: it holds the corpus and its ids in memory, "
                        "~4.7 GB per 100 MB (default: %(default)s)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from gptcore.tokenizer import Tokenizer
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        tok = Tokenizer.train_bpe(SHAKESPEARE.read_text(encoding="utf-8"), 8192)
        tok.save(tmp / "tokenizer.json")
        print(f"{os.cpu_count()} cores; byte-level BPE, {tok.vocab_size} tokens\n")
        print("| corpus | engine | MB/s | tokens/s | vs 1 thread | peak RSS |")
        print("|---|---|---|---|---|---|")
        for mb in args.mb:
            size = make_corpus(tmp / f"corpus{mb}", mb)
            engines = ("1 thread", "prepare", "naive") if mb <= args.naive_max_mb else ("1 thread", "prepare")
            results = {e: run(e, tmp / f"corpus{mb}", tmp / "tokenizer.json", tmp / f"out-{mb}-{i}")
                       for i, e in enumerate(engines)}
            base = size / results["1 thread"][0]
            for engine, (seconds, n, rss, child) in results.items():
                peak = f"{rss / 1e6:,.0f} MB" + (f" (+ workers of {child / 1e6:,.0f} MB each)" if child else "")
                print(f"| {size / 1e6:,.0f} MB | {engine} | {size / seconds / 1e6:.2f} | {n / seconds:,.0f} | "
                      f"{size / seconds / base:.2f}x | {peak} |", flush=True)
            if "naive" not in results:
                print(f"| {size / 1e6:,.0f} MB | naive | not run: above --naive-max-mb {args.naive_max_mb} "
                      f"(its memory grows with the corpus) | | | |", flush=True)
            for out in tmp.glob(f"out-{mb}-*"):
                subprocess.run(["rm", "-rf", str(out)], check=False)


if __name__ == "__main__":
    main()
