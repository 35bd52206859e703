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
for prepare also its largest worker). Every engine runs at every size under
a watchdog: one whose processes together pass --memory-cap-gb is stopped,
and its row says so, with the stage it had reached and the time it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
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
print("stage: reading", file=sys.stderr, flush=True)
docs = list(documents(CORPUS))
print("stage: encode_batch", file=sys.stderr, flush=True)
encoded = TOK.encode_batch(docs)
print("stage: writing", file=sys.stderr, flush=True)
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


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # a process that ended while we looked
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, parent in parents.items() if parent == pid and c not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


class Stopped(Exception):
    """An engine passed the memory cap: (seconds it ran, bytes it held, its last stage)."""


def run(engine: str, corpus: Path, tokenizer: Path, out: Path, cap: int) -> tuple[float, int, int, int]:
    code = CHILD.format(single=engine == "1 thread", corpus=str(corpus), out=str(out), tokenizer=str(tokenizer),
                        body=ENGINES[engine])
    err_path = out.with_suffix(".stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
        t0 = time.perf_counter()
        while proc.poll() is None:
            held = tree_rss(proc.pid)
            if held > cap:
                os.killpg(proc.pid, 9)
                proc.wait()
                stages = [line for line in err_path.read_text().splitlines() if line.startswith("stage: ")]
                raise Stopped(time.perf_counter() - t0, held, f", in {stages[-1][7:]}" if stages else "")
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{engine} failed: {err_path.read_text()[-2000:]}")
    seconds, n, rss, child = proc.stdout.read().split()[-4:]
    return float(seconds), int(n), int(rss), int(child)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, nargs="+", default=[500, 1000], help="corpus sizes, MB")
    p.add_argument("--memory-cap-gb", type=float, default=16.0,
                   help="stop an engine whose processes together hold more than this (default: %(default)s; "
                        "the naive engine holds ~4.7 GB per 100 MB of text)")
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
            base = None
            for i, engine in enumerate(("1 thread", "prepare", "naive")):
                row = f"| {size / 1e6:,.0f} MB | {engine} |"
                try:
                    seconds, n, rss, child = run(engine, tmp / f"corpus{mb}", tmp / "tokenizer.json",
                                                 tmp / f"out-{mb}-{i}", int(args.memory_cap_gb * 1e9))
                except Stopped as stop:
                    seconds, held, stage = stop.args
                    print(f"{row} stopped | | | > {held / 1e9:.1f} GB after {seconds:.0f} s{stage} |", flush=True)
                    continue
                base = base or size / seconds  # the 1-thread loop runs first
                peak = f"{rss / 1e6:,.0f} MB" + (f" (+ workers of {child / 1e6:,.0f} MB each)" if child else "")
                print(f"{row} {size / seconds / 1e6:.2f} | {n / seconds:,.0f} | {size / seconds / base:.2f}x | "
                      f"{peak} |", flush=True)
            for out in tmp.glob(f"out-{mb}-*"):
                subprocess.run(["rm", "-rf", str(out)], check=False)


if __name__ == "__main__":
    main()
