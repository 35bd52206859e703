"""Token datasets of any size: documents streamed from text, jsonl, parquet or
Hugging Face `datasets`, encoded in worker processes with bounded memory,
written as shards with a manifest.

    python -m jaxgpt.prepare data.corpus=SPEC [data.tokenizer=PATH/tokenizer.json] --out DIR

DIR/
    manifest.json     what defines the dataset (source, tokenizer sha256, settings), and per split the shards
                      (file, tokens, sha256) and the number of documents
    tokenizer.json    the tokenizer the ids belong to
    train-00000.bin   flat uint16 (vocabularies below 65536) or uint32 ids, documents separated by the
    val-00000.bin     tokenizer's eos (or the declared separator id)

Documents go to val by their index (every round(1 / val_fraction)-th), so
the split is by documents, stated in the manifest. Memory stays bounded:
documents are read lazily, at most 2 x num_proc batches are in flight, and
a shard is written as its batches arrive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptcore.corpus import sha256_file
from gptcore.data import DataError, _chunks
from gptcore.errors import check_regular_file, write_atomic
from gptcore.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "jaxgpt-tokens-1"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


# -- documents ------------------------------------------------------------------------
def source_files(spec: str) -> list[Path]:
    """The files a corpus spec names: one file, or every text / jsonl / parquet file under a directory (sorted)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus path does not exist: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"no {', '.join(TEXT_SUFFIXES)} files under {path}")
        return files
    return [check_regular_file(path, "corpus file")]


def documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Every document of the corpus, lazily: a .txt file is one document, a
    jsonl line or a parquet row one each (its `text_field`), an
    `hf:NAME[:CONFIG][:SPLIT]` spec a streamed Hugging Face dataset's rows."""
    if spec.startswith("hf:"):
        yield from _hf_documents(spec, text_field)
        return
    for path in source_files(spec):
        name = path.name
        if name.endswith(".txt"):
            yield _utf8(path.read_bytes(), str(path))
        elif name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield _field(_json_line(line, path, line_no), text_field, f"{path}:{line_no}")
        else:
            yield from _parquet_documents(path, text_field)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _json_line(line: bytes, path: Path, line_no: int) -> dict:
    try:
        record = json.loads(_utf8(line, f"{path}:{line_no}"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
    return record


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: no text field {text_field!r} (set data.text_field)")
    return record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    file = pq.ParquetFile(path)
    if text_field not in file.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (set data.text_field)")
    row = 0
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: {text_field!r} is {type(text).__name__}, not text")
            yield text


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    """hf:NAME[:CONFIG][:SPLIT] (default split train), streamed: nothing is downloaded whole."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.corpus=hf:... needs the datasets package (pip install datasets)") from None
    name, config, split = (spec[3:].split(":") + [None, None])[:3]
    rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for i, row in enumerate(rows):
        yield _field(row, text_field, f"{spec} row {i}")


# -- encoding ---------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, separator: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxgpt-prepare-{os.getpid()}.json"
    path.write_text(tokenizer_json, encoding="utf-8")
    _WORKER.update(tokenizer=Tokenizer.load(path), separator=separator)
    path.unlink()


# a piece of a document: (text, starts the document, ends the document)
Piece = tuple[str, bool, bool]


def _encode(batch: list[Piece]) -> list[np.ndarray]:
    """Each piece's ids, the separator after a document's last piece."""
    tok, sep = _WORKER["tokenizer"], _WORKER["separator"]
    out = []
    for text, first, last in batch:
        ids = tok.encode(text, start=first) if text else []
        out.append(np.asarray(ids + [sep] if last else ids, dtype=np.int64))
    return out


def _batches(docs: Iterator[str], batch_bytes: int) -> Iterator[list[Piece]]:
    """Documents as pieces of about batch_bytes at most (cut where byte-level
    BPE never merges across, gptcore.data._chunks, so a document's ids are
    those of its whole text), grouped into batches of about batch_bytes:
    a worker holds one batch's encodings, never a whole large document's."""
    batch: list[Piece] = []
    size = 0
    for doc in docs:
        pieces = list(_chunks(doc, batch_bytes)) if len(doc) > batch_bytes else [doc]
        for i, piece in enumerate(pieces):
            batch.append((piece, i == 0, i == len(pieces) - 1))
            size += len(piece)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """One split's shards: ids appended as they come, a new file every shard_tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self.f = self.hash = None
        self.count = 0

    def add(self, ids: np.ndarray, ends_document: bool = True) -> None:
        self.documents += ends_document
        ids = ids.astype(self.dtype)
        while len(ids):
            if self.f is None:
                self.name = f"{self.split}-{len(self.shards):05d}.bin"
                self.f, self.hash, self.count = open(self.out / f".{self.name}.tmp", "wb"), hashlib.sha256(), 0
            take = ids[:self.limit - self.count]
            data = take.tobytes()
            self.f.write(data)
            self.hash.update(data)
            self.count += len(take)
            ids = ids[len(take):]
            if self.count == self.limit:
                self.close()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            os.replace(self.out / f".{self.name}.tmp", self.out / self.name)
            self.shards.append({"file": self.name, "tokens": self.count, "sha256": self.hash.hexdigest()})
            self.f = None


def prepare(spec: str, tokenizer: Tokenizer, out_dir: str | Path, *, text_field: str = "text",
            val_fraction: float = 0.01, num_proc: int | None = None, shard_tokens: int = 100_000_000,
            batch_bytes: int = 1 << 20, progress: bool = False) -> dict:
    """Encode the corpus `spec` into out_dir (see the module docstring);
    returns the manifest. A directory whose manifest says the same source,
    tokenizer and settings, with every shard's checksum right, is reused."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    separator = tokenizer.eos_id
    if separator is None:
        separator = tokenizer.token_to_id("\n")
    if separator is None:
        raise DataError("the tokenizer has no eos token (nor '\\n') to separate documents with")
    out = Path(out_dir)
    identity = {"format": FORMAT, "source": spec, "source_files": _source_stamp(spec), "text_field": text_field,
                "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "separator": separator, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                "val_rule": "document i is val when val_fraction > 0 and (i + 1) % round(1 / val_fraction) == 0"}
    done = read_manifest(out, verify=True, quiet=True)
    if done is not None and {k: done.get(k) for k in identity} == identity:
        return done
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    num_proc = num_proc or os.cpu_count() or 1
    bar = _progress(progress)
    index = 0
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker,
                                                   (tokenizer.hf.to_str(), separator)) as pool:
        pending: deque = deque()
        for batch in _batches(documents(spec, text_field), batch_bytes):
            pending.append((pool.apply_async(_encode, (batch,)), batch))
            while len(pending) > 2 * num_proc:
                index = _drain(pending.popleft(), writers, every, index, bar)
        while pending:
            index = _drain(pending.popleft(), writers, every, index, bar)
    for w in writers.values():
        w.close()
    if writers["train"].documents == 0 or not writers["train"].shards:
        raise DataError(f"the corpus {spec} has no documents")
    tokenizer.save(out / "tokenizer.json")
    manifest = {**identity, "dtype": dtype.name,
                "splits": {s: {"documents": w.documents, "shards": w.shards} for s, w in writers.items()}}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if bar is not None:
        bar.close()
    return manifest


def _drain(item, writers: dict, every: int, index: int, bar) -> int:
    """Write a finished batch's ids; index counts whole documents (val: every `every`-th)."""
    result, batch = item
    for ids, (text, _, last) in zip(result.get(), batch):
        split = "val" if every and (index + 1) % every == 0 else "train"
        writers[split].add(ids, last)
        index += last
    if bar is not None:
        bar.update(sum(len(text) for text, _, _ in batch))
    return index


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(unit="char", unit_scale=True, desc="encoding")


def _source_stamp(spec: str) -> list | str:
    """What identifies the source's content cheaply: (file, size, mtime) of each file; the spec for hf: ones."""
    if spec.startswith("hf:"):
        return spec
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(spec)]


def read_manifest(directory: str | Path, verify: bool = False, quiet: bool = False) -> dict | None:
    """The manifest of a token dataset; with verify, each shard's size and
    sha256 checked. A missing or broken one: None when quiet, else DataError."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                path = directory / shard["file"]
                if path.stat().st_size != shard["tokens"] * itemsize:
                    raise ValueError(f"{shard['file']} has {path.stat().st_size} bytes, the manifest says "
                                     f"{shard['tokens'] * itemsize}")
                if verify and sha256_file(path) != shard["sha256"]:
                    raise ValueError(f"{shard['file']}: its checksum does not match the manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if quiet:
            return None
        raise DataError(f"{directory}: not a usable token dataset ({e}); prepare it again") from None
    return manifest


class ShardedTokens:
    """A split's shards as one 1-D token sequence (memory-mapped, nothing
    read until indexed): len() and integer-array indexing, which is what the
    window samplers use."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        manifest = read_manifest(directory)
        shards = manifest["splits"][split]["shards"]
        self.dtype = np.dtype(manifest["dtype"])
        self.maps = [np.memmap(directory / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))
                     for s in shards if s["tokens"]]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])  # (n_shards + 1,)
        self.ndim, self.lazy_tokens = 1, True

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1  # which shard holds each position
        out = np.empty(index.shape, self.dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self.maps[s][index[where] - self.offsets[s]]
        return out
