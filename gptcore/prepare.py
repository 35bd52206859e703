"""Token datasets of any size: a corpus's documents (gptcore.documents)
encoded in worker processes with bounded memory, written as shards with a
manifest. Training reads them through gptcore.shards; data.corpus runs
prepare one into OUT_DIR/data, `python -m jaxgpt.prepare` anywhere.

DIR/
    manifest.json     what defines the dataset (source, tokenizer sha256, settings), every file (tokens,
                      sha256), and per split its slices of the files and its documents
    tokenizer.json    the tokenizer the ids belong to
    tokens-00000.bin  flat uint16 (vocabularies up to 65536) or uint32 ids, each document followed by the
    ...               tokenizer's eos (or "\\n" for a char tokenizer without one)

The validation split (data.val_split) is either the last val_fraction of the
token stream ("tail", nanoGPT's rule: a one-document corpus splits too), or
every round(1 / val_fraction)-th document ("documents", in train-*.bin and
val-*.bin files). Memory stays bounded: documents are read lazily and cut
into pieces of about batch_bytes, at most 2 x num_proc batches are in
flight, and files are written as batches arrive.

A file is closed after the batch that fills it past shard_tokens, and the
work done so far is saved then (.progress.json): a killed prepare resumes
after its last complete file (each one checked against its sha256), and
writes what an uninterrupted one writes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptcore.corpus import sha256_file
from gptcore.data import DataError
from gptcore.documents import BUILT_IN, Piece, known_size, pieces, source_files, source_stamp
from gptcore.errors import write_atomic
from gptcore.lock import run_lock
from gptcore.shards import FORMAT, MANIFEST, read_manifest
from gptcore.tokenizer import Tokenizer
from gptcore.train_config import VAL_SPLITS

PROGRESS = ".progress.json"
_VAL_RULES = {"tail": "the last int(val_fraction * tokens) tokens of the stream",
              "documents": "document i (from 0) is val when (i + 1) % round(1 / val_fraction) == 0"}


def separator_id(tokenizer: Tokenizer) -> int:
    """The id written after each document: the tokenizer's eos, else "\\n"'s."""
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.token_to_id("\n")
    if sep is None:
        raise DataError("the tokenizer has no eos token (nor '\\n') to separate documents with")
    return sep


# -- encoding ---------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, separator: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxgpt-prepare-{os.getpid()}.json"
    path.write_text(tokenizer_json, encoding="utf-8")
    _WORKER.update(tokenizer=Tokenizer.load(path), separator=separator)
    path.unlink()


def _encode(batch: list[Piece]) -> list[np.ndarray]:
    """Each piece's ids, the separator after a document's last piece."""
    tok, sep = _WORKER["tokenizer"], _WORKER["separator"]
    out = []
    for text, first, last in batch:
        ids = tok.encode(text, start=first, what="a document") if text else []
        out.append(np.asarray(ids + [sep] if last else ids, dtype=np.int64))
    return out


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Inline:
    """The pool's interface in this process (one worker, or a small corpus: no process to start)."""

    def __init__(self, tokenizer: Tokenizer, separator: int):
        _WORKER.update(tokenizer=tokenizer, separator=separator)

    def apply_async(self, fn, args) -> "_Done":
        return _Done(fn(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _WORKER.clear()


def _batches(stream: Iterator[Piece], batch_bytes: int) -> Iterator[list[Piece]]:
    """Consecutive pieces (gptcore.documents.pieces) in batches of about
    batch_bytes: a worker holds one batch's encodings, never a whole large
    document's."""
    batch: list[Piece] = []
    size = 0
    for piece in stream:
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _FileWriter:
    """One stream's files (tokens, train or val): ids appended as they come, a
    file per round (NAME-ROUND.bin), written under a temporary name until closed."""

    def __init__(self, out: Path, name: str, dtype: np.dtype):
        self.out, self.name, self.dtype = out, name, dtype
        self.f = self.hash = None
        self.count = 0

    def add(self, ids: np.ndarray, round_no: int) -> None:
        if self.f is None:
            self.file = f"{self.name}-{round_no:05d}.bin"
            self.f, self.hash, self.count = open(self.out / f".{self.file}.tmp", "wb"), hashlib.sha256(), 0
        data = ids.astype(self.dtype).tobytes()
        self.f.write(data)
        self.hash.update(data)
        self.count += len(ids)

    def close(self) -> dict | None:
        """The finished file's manifest entry (None when nothing was written this round)."""
        if self.f is None:
            return None
        self.f.close()
        os.replace(self.out / f".{self.file}.tmp", self.out / self.file)
        self.f, count, self.count = None, self.count, 0
        return {"file": self.file, "tokens": count, "sha256": self.hash.hexdigest()}


class _Progress:
    """What is done: the files of the finished rounds, how many batches they
    hold, and the documents seen. Saved after each round; a rerun with the same
    identity takes it up after checking each file's sha256."""

    def __init__(self, out: Path, identity: dict):
        self.path, self.identity = out / PROGRESS, identity
        self.files: list[dict] = []
        self.rounds: list[dict] = []
        self.batches = self.index = 0
        self.documents = {"train": 0, "val": 0}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            rounds = saved["rounds"] if saved.get("identity") == identity else []
        except (OSError, ValueError, KeyError, TypeError):
            rounds = []
        for entry in rounds:  # take up the rounds whose files are intact
            if not all((out / f["file"]).is_file() and sha256_file(out / f["file"]) == f["sha256"]
                       for f in entry["files"]):
                break
            self.files += entry["files"]
            self.rounds.append(entry)
            self.batches, self.index, self.documents = entry["batches"], entry["index"], entry["documents"]

    def end_round(self, files: list[dict]) -> None:
        self.files += files
        self.rounds.append({"files": files, "batches": self.batches, "index": self.index,
                            "documents": dict(self.documents)})
        write_atomic(self.path, json.dumps({"identity": self.identity, "rounds": self.rounds}) + "\n")

    @property
    def round_no(self) -> int:
        return len(self.rounds)


def prepare(spec: str, tokenizer: Tokenizer, out_dir: str | Path, *, text_field: str = "text",
            cache_dir: str | Path = "~/.cache/jaxgpt", val_fraction: float = 0.1, val_split: str = "tail",
            num_proc: int | None = None, shard_tokens: int = 100_000_000, batch_bytes: int = 1 << 20,
            progress: bool = False) -> dict:
    """Encode the corpus `spec` into out_dir (see the module docstring);
    returns the manifest. A directory whose manifest says the same source,
    tokenizer and settings, with every file's checksum right, is reused."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_split not in VAL_SPLITS:
        raise DataError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    separator = separator_id(tokenizer)
    out = Path(out_dir)
    identity = {"format": FORMAT, "source": spec, "source_files": source_stamp(spec), "text_field": text_field,
                "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "separator": separator, "val_fraction": val_fraction, "val_split": val_split,
                "val_rule": _VAL_RULES[val_split], "shard_tokens": shard_tokens, "batch_bytes": batch_bytes}
    done = read_manifest(out, verify=True, quiet=True)
    if done is not None and {k: done.get(k) for k in identity} == identity:
        return done
    created = not out.exists()
    # a char or byte-level BPE tokenizer encodes a document piece by piece; another ("hf") needs it whole
    stream = pieces(spec, text_field, cache_dir, size=batch_bytes, cut=tokenizer.kind != "hf")
    with run_lock(out, "one prepare per dataset directory; wait for it or choose another --out"):
        try:
            return _write(stream, tokenizer, out, identity, num_proc=num_proc, progress=progress)
        except Exception:  # bad input: a directory this call made goes (Ctrl-C and kill keep it to resume)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _write(stream: Iterator[Piece], tokenizer: Tokenizer, out: Path, identity: dict, *, num_proc: int | None,
           progress: bool) -> dict:
    """prepare's work, under the directory's lock: encode the pieces, write
    the files and the manifest (`identity`: the settings, as prepare made them)."""
    spec, separator, batch_bytes = identity["source"], identity["separator"], identity["batch_bytes"]
    val_split, val_fraction, shard_tokens = identity["val_split"], identity["val_fraction"], identity["shard_tokens"]
    (out / MANIFEST).unlink(missing_ok=True)  # a half-rebuilt directory must never look current
    for stale in out.glob(".*.bin.tmp"):  # a killed run's unfinished file
        stale.unlink()
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    done = _Progress(out, identity)
    streams = ("train", "val") if val_split == "documents" else ("tokens",)
    writers = {name: _FileWriter(out, name, dtype) for name in streams}
    every = round(1 / val_fraction) if val_split == "documents" and val_fraction > 0 else 0
    num_proc = num_proc or os.cpu_count() or 1
    size = known_size(spec)
    small = size is not None and size <= 4 * batch_bytes
    bar = _Bar(spec) if progress else None

    def write(ids_batch, batch) -> None:
        for ids, (text, _, last) in zip(ids_batch, batch):
            split = "val" if every and (done.index + 1) % every == 0 else "train"
            writers[split if every else "tokens"].add(ids, done.round_no)
            done.documents[split] += last
            done.index += last
        done.batches += 1
        if writers[streams[0]].count >= shard_tokens:
            done.end_round([f for f in (w.close() for w in writers.values()) if f])
        if bar is not None:
            bar.update(batch, ids_batch)

    pool = (_Inline(tokenizer, separator) if num_proc == 1 or small else
            multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (tokenizer.hf.to_str(), separator)))
    with pool:
        pending: deque = deque()
        for i, batch in enumerate(_batches(stream, batch_bytes)):
            if i < done.batches:  # in a file a killed run finished
                continue
            pending.append((pool.apply_async(_encode, (batch,)), batch))
            while len(pending) > 2 * num_proc:
                result, batch = pending.popleft()
                write(result.get(), batch)
        while pending:
            result, batch = pending.popleft()
            write(result.get(), batch)
    done.files += [f for f in (w.close() for w in writers.values()) if f]
    if bar is not None:
        bar.close()
    if sum(f["tokens"] for f in done.files) == done.index:  # nothing but separators
        raise DataError(f"the corpus {spec} is empty ({done.index} documents, no text)")
    tokenizer.save(out / "tokenizer.json")
    manifest = {**identity, "dtype": dtype.name, "documents": done.index, "files": done.files,
                "splits": _splits(done, val_split, val_fraction)}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    done.path.unlink(missing_ok=True)
    kept = {f["file"] for f in done.files}
    for name in ("tokens", "train", "val"):  # files of an earlier, different dataset in this directory
        for orphan in out.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9].bin"):
            if orphan.name not in kept:
                orphan.unlink()
    return manifest


def _splits(done: _Progress, val_split: str, val_fraction: float) -> dict:
    """Each split's slices of the files ({"file", "offset", "tokens"}), tokens and documents."""
    if val_split == "documents":
        return {s: {"documents": done.documents[s], "tokens": sum(f["tokens"] for f in done.files
                                                                   if f["file"].startswith(s)),
                    "shards": [{"file": f["file"], "offset": 0, "tokens": f["tokens"]}
                               for f in done.files if f["file"].startswith(s)]}
                for s in ("train", "val")}
    total = sum(f["tokens"] for f in done.files)
    n_train = total - int(total * val_fraction)
    splits = {s: {"documents": None, "tokens": 0, "shards": []} for s in ("train", "val")}
    at = 0  # the stream position of the file's first token
    for f in done.files:
        for s, lo, hi in (("train", 0, n_train), ("val", n_train, total)):
            begin, end = max(lo, at), min(hi, at + f["tokens"])
            if begin < end:
                splits[s]["shards"].append({"file": f["file"], "offset": begin - at, "tokens": end - begin})
                splits[s]["tokens"] += end - begin
        at += f["tokens"]
    return splits


class _Bar:
    """tqdm over the text's UTF-8 bytes (MB/s; a total when the corpus is .txt files), with tokens/s."""

    def __init__(self, spec: str):
        from tqdm import tqdm
        files = [] if spec in BUILT_IN or spec.startswith("hf:") else source_files(spec)
        total = sum(p.stat().st_size for p in files) if files and all(p.suffix == ".txt" for p in files) else None
        self.tqdm = tqdm(total=total, unit="B", unit_scale=True, desc="encoding", dynamic_ncols=True)
        self.tokens = 0

    def update(self, batch: list[Piece], ids_batch: list[np.ndarray]) -> None:
        self.tokens += sum(len(ids) for ids in ids_batch)
        self.tqdm.set_postfix_str(f"{self.tokens / max(self.tqdm.format_dict['elapsed'], 1e-9):,.0f} tokens/s",
                                  refresh=False)
        self.tqdm.update(sum(len(text.encode("utf-8")) for text, _, _ in batch))

    def close(self) -> None:
        self.tqdm.close()
