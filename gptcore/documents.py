"""A corpus as a stream of documents, read lazily, whatever it is stored in.

    for doc in documents("data/owt", text_field="text", cache_dir="~/.cache/jaxgpt"): ...

A spec names one of the built-in corpora (gptcore.corpus: shakespeare,
tinyshakespeare, gutenberg; each one document), a file, a directory tree of
.txt / .jsonl / .jsonl.gz / .parquet files (sorted by path), or a Hugging Face
dataset `hf:NAME[:CONFIG][:SPLIT]` (streamed). A .txt file is one document, a
jsonl line or a parquet row one each (its text field).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from gptcore.corpus import _decode_text, corpus_from_spec
from gptcore.data import DataError
from gptcore.errors import check_regular_file

BUILT_IN = ("shakespeare", "tinyshakespeare", "gutenberg")
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


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


def documents(spec: str, text_field: str = "text", cache_dir: str | Path = "~/.cache/jaxgpt") -> Iterator[str]:
    """Every document of the corpus `spec` (see the module docstring), lazily."""
    for doc in _sources(spec, text_field, cache_dir):
        yield doc if isinstance(doc, str) else _decode_text(doc.read_bytes(), str(doc))


# a piece of a document: (text, starts the document, ends the document)
Piece = tuple[str, bool, bool]


def pieces(spec: str, text_field: str = "text", cache_dir: str | Path = "~/.cache/jaxgpt", *,
           size: int = 1 << 20, cut: bool = True) -> Iterator[Piece]:
    """The corpus's documents as pieces of about `size` characters, cut only
    where byte-level BPE never merges across (see _cuts), so that a document's
    pieces encoded one by one give its ids. A .txt file is read `size` bytes at
    a time: a document larger than memory streams. With cut False (tokenizers
    that may merge across any cut), whole documents."""
    for doc in _sources(spec, text_field, cache_dir):
        if isinstance(doc, Path) and cut:
            yield from _txt_pieces(doc, size)
            continue
        text = doc if isinstance(doc, str) else _decode_text(doc.read_bytes(), str(doc))
        parts = list(_cuts(text, size)) if cut and len(text) > size else [text]
        for i, part in enumerate(parts):
            yield part, i == 0, i == len(parts) - 1


def _sources(spec: str, text_field: str, cache_dir: str | Path) -> Iterator[str | Path]:
    """The corpus's documents: text, or the Path of a .txt file (one document, read by the caller)."""
    if spec in BUILT_IN:
        yield corpus_from_spec(spec, Path(cache_dir).expanduser())
        return
    if spec.startswith("hf:"):
        yield from _hf_documents(spec, text_field)
        return
    for path in source_files(spec):
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield _field(_json_line(line, path, line_no), text_field, f"{path}:{line_no}")
        elif name.endswith(".parquet"):
            yield from _parquet_documents(path, text_field)
        else:  # .txt, or a file named directly: UTF-8 text (a BOM dropped, CRLF as LF), checked per file
            yield path


# After "\n" with a non-space before it and a non-space (or "\n" and a non-space) after it: the GPT-2
# pre-tokenizer that byte-level BPE uses ends a token there in any text, so no merge crosses it
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\n?\S)")


def _cuts(text: str, chunk_chars: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each at least `chunk_chars` long (but the
    last), cut only at _SAFE_CUT, so the pieces' ids joined are the ids of the
    whole text. Yields at least one piece."""
    begin = 0
    while True:
        cut = _SAFE_CUT.search(text, begin + chunk_chars) if begin + chunk_chars < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[begin:end]
        if end == len(text):
            return
        begin = end


def _txt_pieces(path: Path, size: int) -> Iterator[Piece]:
    """A .txt file's text as _decode_text reads it (the same checks and
    errors), `size` bytes at a time, in pieces cut as _cuts cuts (at the first
    safe cut `size` characters in): memory holds about one piece."""
    check_regular_file(path, "corpus file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, held, scanned, offset, first = "", "", 0, 0, True
    with open(path, "rb") as f:
        while True:
            data = f.read(size)
            skip = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0  # a BOM
            if (nul := data.find(b"\0")) >= 0:
                raise DataError(f"{path} looks binary (NUL byte at offset {offset + nul}), expected UTF-8 text")
            try:
                new = held + decoder.decode(data[skip:], final=not data)
            except UnicodeDecodeError as e:
                at = offset + skip + e.start - len(decoder.getstate()[0])  # the decoder held earlier bytes
                raise DataError(f"{path} is not UTF-8 text (byte 0x{_byte_at(path, at):02x} at offset {at})") \
                    from None
            offset += len(data)
            held = "\r" if data and new.endswith("\r") else ""  # a CRLF may straddle two reads
            pending += new[:len(new) - len(held)].replace("\r\n", "\n")
            if not data:
                yield pending, first, True
                return
            # the first safe cut `size` characters in (lookbehind sees before pos: nothing is searched twice)
            while (cut := _SAFE_CUT.search(pending, max(size, scanned - 2))) is not None:
                yield pending[:cut.start()], first, False
                pending, scanned, first = pending[cut.start():], 0, False
            scanned = len(pending)


def _byte_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)[0]


def source_stamp(spec: str) -> list | str:
    """What identifies a corpus's content cheaply: (file, size, mtime) of each
    file; the name of a built-in or Hugging Face corpus."""
    if spec in BUILT_IN or spec.startswith("hf:"):
        return spec
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(spec)]


def source_sha256(spec: str) -> str:
    """A hash of source_stamp: what a run's fingerprint records of its corpus."""
    return hashlib.sha256(json.dumps(source_stamp(spec)).encode("utf-8")).hexdigest()


def known_size(spec: str) -> int | None:
    """The corpus's size in bytes where the files tell it (None for hf: specs;
    the built-ins are a few MB)."""
    if spec.startswith("hf:"):
        return None
    if spec in BUILT_IN:
        return 0
    return sum(p.stat().st_size for p in source_files(spec))


def _json_line(line: bytes, path: Path, line_no: int) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start})") \
            from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: no text field {text_field!r} (set data.text_field)")
    return record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not parquet
        raise DataError(f"{path}: not a parquet file ({str(e).splitlines()[0]})") from None
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
