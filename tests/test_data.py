"""Tests of the framework-free data pipeline: tokenizers, corpora, token files,
batch samplers. Offline: every download goes through a fake fetch."""

import hashlib
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from gptcore import corpus
from gptcore.corpus import (
    corpus_from_spec,
    download_gutenberg,
    download_tiny_shakespeare,
    read_corpus,
    shakespeare_corpus,
    strip_gutenberg,
)
from gptcore.data import (
    IGNORE_INDEX,
    DataError,
    RandomWindows,
    SlidingWindows,
    eval_batches,
    pad_batch,
)
from gptcore.prepare import prepare
from gptcore.shards import ShardedTokens
from gptcore.tokenizer import Tokenizer, TokenizerError

TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MIXED = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak.\n中文字符，汉字。\n\n"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    corpus = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    return Tokenizer.train_bpe(corpus, vocab_size=400)


class FakeFetch:
    """A fetch(url) -> bytes that records its calls."""

    def __init__(self, responses: dict[str, bytes]):
        self.responses = responses
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.responses[url]


# -- tokenizers -------------------------------------------------------------------
def test_char_tokenizer_matches_nanogpt_shakespeare_char():
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    tok = Tokenizer.train_char(text)
    assert (tok.kind, tok.vocab_size) == ("char", 65)
    assert tok.encode("\n ") == [0, 1]
    assert tok.encode("A") == [sorted(set(text)).index("A")]
    assert tok.pad_id is None and tok.eos_id is None  # no special tokens by default
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_char_round_trip_unicode_and_whitespace():
    tok = Tokenizer.train_char([MIXED, "\r\n"])
    for s in [MIXED, "汉字\n\n", "  \t ", "\r\n", ""]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("汉字")) == 2


def test_char_special_tokens_come_after_the_characters():
    tok = Tokenizer.train_char("ab", special_tokens=("[eos]",))
    assert tok.encode("ba") == [1, 0]
    assert tok.eos_id == 2
    assert tok.encode("a[eos]b") == [0, 2, 1]  # special tokens need not be spelled in characters


def test_bpe_round_trip_unicode_whitespace_and_specials(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert (bpe.pad_id, bpe.eos_id) == (0, 1)
    for s in [MIXED, "汉字 unseen in training", " leading space", "\nleading newline", "a[eos]b", "", "  "]:
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.encode(" x") != bpe.encode("x")  # injective, unlike HF's conditional prefix space


def test_bpe_encodes_as_the_seed_tokenizer_does(bpe):
    text = "First Citizen:\nYou are all resolved rather to die than to famish?"
    assert bpe.encode(text) == bpe.hf.encode(text).ids  # HF adds the same prefix space
    continued = bpe.encode(text, start=False)
    assert bpe.decode(continued, start=False) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load(tmp_path, bpe, kind):
    tok = Tokenizer.train_char(MIXED) if kind == "char" else bpe
    written = tok.save(tmp_path / "ckpt")
    assert written == tmp_path / "ckpt" / "tokenizer.json"
    for source in (tmp_path / "ckpt", written):
        loaded = Tokenizer.load(source)
        assert loaded.kind == kind
        assert loaded.vocab_size == tok.vocab_size and loaded.fingerprint == tok.fingerprint
        assert loaded.encode(MIXED) == tok.encode(MIXED)
        assert loaded.decode(loaded.encode(MIXED)) == MIXED
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing")


def test_unknown_characters_raise_one_line_error():
    tok = Tokenizer.train_char("abc Z")
    with pytest.raises(TokenizerError) as info:
        tok.encode("ab€c\n€", what="prompt")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("prompt has characters not in the tokenizer's vocabulary: "
                       "'€' (U+20AC) at 2, 5; '\\n' (U+000A) at 4")
    with pytest.raises(TokenizerError, match="text 1 of the batch"):
        tok.encode_batch(["abc", "abd"])


def test_seed_tokenizer_json_is_encoded_safely(tmp_path):
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())  # seed 002 exactly: no initial alphabet, padding on
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.train_from_iterator(["hello world"], trainer=tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[pad]", "[eos]"], show_progress=False))
    hf.enable_padding(pad_id=hf.token_to_id("[pad]"), pad_token="[pad]")
    hf.save(str(tmp_path / "gutenberg_tokenizer.json"), pretty=True)
    assert "中" not in hf.decode(hf.encode("hello 中").ids)  # HF alone drops the unseen bytes

    tok = Tokenizer.load(tmp_path / "gutenberg_tokenizer.json")
    texts = ["he", "hello world", "world"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]  # no padding
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(TokenizerError, match=r"'中' \(U\+4E2D\) at 6"):
        tok.encode("hello 中")


def test_bpe_vocab_size_below_byte_alphabet():
    with pytest.raises(TokenizerError, match="below the 258 tokens"):
        Tokenizer.train_bpe("abc", vocab_size=100)


# -- corpora ----------------------------------------------------------------------
def gutenberg_book(body: str) -> str:
    return ("\ufeffThe Project Gutenberg eBook of A Test\r\n\r\nRelease date: never\r\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\n"
            f"{body}\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\nLicense text\r\n")


def test_other_tokenizer_files_encode_as_tokenizers_does(tmp_path):
    """A tokenizer.json that is neither char nor byte-level BPE (here a
    SentencePiece-style Metaspace BPE as Llama 2's, and a word-level one) is
    kind "hf": its ids and text are exactly what `tokenizers` makes of the file."""
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    meta = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    meta.decoder = tokenizers.decoders.Metaspace()
    meta.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"to": 0, "be": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    for hf, sample in ((meta, "First Citizen:\nBefore we proceed"), (words, "to be or not to be")):
        hf.save(str(tmp_path / "t.json"))
        tok = Tokenizer.load(tmp_path / "t.json")
        assert tok.kind == "hf"
        assert tok.encode(sample) == hf.encode(sample, add_special_tokens=False).ids
        assert tok.decode(tok.encode(sample)) == hf.decode(hf.encode(sample).ids, skip_special_tokens=False)
    assert Tokenizer.load(tmp_path / "t.json").encode("to be or") == [0, 1, 2]  # unknown words: its unk
    assert Tokenizer.train_char(text).kind == "char" and Tokenizer.train_bpe(text, 300).kind == "bpe"


def test_strip_gutenberg():
    book = gutenberg_book("  CHAPTER I.\r\n\r\n   It was a dark night;  \r\nthe end.").replace("\r\n", "\n")
    assert strip_gutenberg(book) == "CHAPTER I.\nIt was a dark night;\nthe end."
    with pytest.raises(DataError, match="no '\\*\\*\\* START OF"):
        strip_gutenberg("just some text", name="x.txt")
    with pytest.raises(DataError, match="x.txt has no '\\*\\*\\* END OF"):
        strip_gutenberg(book.split("*** END")[0], name="x.txt")


def test_download_gutenberg_caches(tmp_path):
    fetch = FakeFetch({corpus.GUTENBERG_URL.format(id=84): gutenberg_book("It's alive!").encode("utf-8"),
                       corpus.GUTENBERG_URL.format(id=41): gutenberg_book("A headless horseman.").encode("utf-8")})
    books = {"frankenstein": 84, "sleepy_hollow": 41}
    assert download_gutenberg(books, tmp_path, fetch) == {"frankenstein": "It's alive!",
                                                          "sleepy_hollow": "A headless horseman."}
    assert download_gutenberg([84], tmp_path, fetch) == {"pg84": "It's alive!"}
    assert len(fetch.calls) == 2  # the second call read the cache
    assert corpus.GUTENBERG_BOOKS["memoirs_of_grant"] == 4367 and len(corpus.GUTENBERG_BOOKS) == 11


def test_download_errors_are_one_line(tmp_path):
    def offline(url):
        raise urllib.error.URLError("no route to host")

    with pytest.raises(DataError, match=r"could not download https://www\.gutenberg\.org/ebooks/84\.txt\.utf-8.*"
                                        r"pass data\.corpus=PATH to a local copy"):
        download_gutenberg([84], tmp_path, offline)
    error_page = FakeFetch({corpus.GUTENBERG_URL.format(id=84): b"<html>Service unavailable</html>"})
    with pytest.raises(DataError, match=r"https://www\.gutenberg\.org/ebooks/84\.txt\.utf-8 has no '\*\*\* START"):
        download_gutenberg([84], tmp_path, error_page)
    assert not (tmp_path / "gutenberg" / "pg84.txt").exists()


def test_tiny_shakespeare_download_verifies_and_caches(tmp_path):
    good = FakeFetch({corpus.TINY_SHAKESPEARE_URL: TINY_SHAKESPEARE.read_bytes()})
    path = download_tiny_shakespeare(tmp_path, good)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == corpus.TINY_SHAKESPEARE_SHA256
    assert download_tiny_shakespeare(tmp_path, good) == path
    text = corpus_from_spec("tinyshakespeare", tmp_path, good)
    assert len(good.calls) == 1
    assert len(text) == 1_115_394 and text.startswith("First Citizen:\n")

    path.write_text("corrupted cache")  # a bad cached file is fetched again
    assert download_tiny_shakespeare(tmp_path, good).read_bytes() == TINY_SHAKESPEARE.read_bytes()
    assert len(good.calls) == 2

    bad = FakeFetch({corpus.TINY_SHAKESPEARE_URL: b"<html>rate limited</html>"})
    with pytest.raises(DataError, match="has sha256 .* expected 86c4e6aa9db7"):
        download_tiny_shakespeare(tmp_path / "fresh", bad)
    assert not (tmp_path / "fresh" / "tinyshakespeare.txt").exists()


def test_offline_shakespeare_corpus():
    text = shakespeare_corpus()
    assert len(text) > 4_000_000
    assert re.match(r"[A-Z][A-Za-z '&-]*:\n[^\n]+\n", text)
    assert not re.search(r"[*_#\[\]\\]", text)  # no markdown left
    speeches = text.split("\n\n")
    assert all(re.match(r"[^\n]+:\n", s) for s in speeches[:1000])
    assert text.endswith("\n") and "\n\n\n" not in text


def test_read_corpus(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second\r\nfile")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_corpus(tmp_path) == "first\n\nsecond\nfile"
    assert read_corpus(tmp_path / "a.txt") == "first"
    assert corpus_from_spec(str(tmp_path / "a.txt"), tmp_path) == "first"

    (tmp_path / "bin.dat").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.dat").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.dat").write_text(" \n\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    cases = {
        "missing": "corpus path does not exist",
        "bin.dat": r"bin\.dat looks binary \(NUL byte at offset 3\)",
        "latin1.dat": r"latin1\.dat is not UTF-8 text \(byte 0xe9 at offset 3\)",
        "blank.dat": "is empty",
        "empty": r"no \*\.txt files",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_corpus(tmp_path / name)


# -- token files (gptcore.prepare, as a data.corpus run prepares them) ------------
def tokens_of(directory: Path, split: str) -> np.ndarray:
    tokens = ShardedTokens(directory, split)
    return tokens[np.arange(len(tokens))]


def test_tail_split_and_reuse(tmp_path):
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    spec, out = str(tmp_path / "c.txt"), tmp_path / "ds"
    tok = Tokenizer.train_char(text)
    manifest = prepare(spec, tok, out, num_proc=1)
    train, val = tokens_of(out, "train"), tokens_of(out, "val")
    assert train.dtype == np.uint16 and manifest["val_split"] == "tail"
    assert (len(train), len(val)) == (18_001, 2_000)  # the document and its "\n" separator; val: the last 10%
    assert np.array_equal(np.concatenate([train, val]), tok.encode(text + "\n"))

    stamp = (out / manifest["files"][0]["file"]).stat().st_mtime_ns
    assert prepare(spec, tok, out, num_proc=1) == manifest
    assert (out / manifest["files"][0]["file"]).stat().st_mtime_ns == stamp  # reused, not rewritten

    assert prepare(spec, tok, out, num_proc=1, val_fraction=0.5)["splits"]["val"]["tokens"] == 10_000
    (tmp_path / "c.txt").write_text(text[:999], encoding="utf-8")
    assert prepare(spec, tok, out, num_proc=1)["splits"]["train"]["tokens"] == 900
    other = Tokenizer.train_char(text + "#")
    assert prepare(spec, other, out, num_proc=1)["tokenizer_sha256"] == other.fingerprint
    with open(out / manifest["files"][0]["file"], "r+b") as f:
        f.truncate(10)  # damaged files are rebuilt, not trusted
    prepare(spec, other, out, num_proc=1)
    assert len(tokens_of(out, "val")) == 100


def test_bpe_pieces_equal_whole_encoding(tmp_path, bpe):
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:30_000] + "\n\n  indented\n汉字\n"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "c.txt"), bpe, tmp_path / "ds", val_fraction=0.0, batch_bytes=500, num_proc=1)
    stream = tokens_of(tmp_path / "ds", "train")
    assert np.array_equal(stream, bpe.encode(text) + [bpe.eos_id])
    assert bpe.decode(stream[:-1]) == text
    assert len(ShardedTokens(tmp_path / "ds", "val")) == 0


def test_token_file_errors(tmp_path):
    (tmp_path / "c.txt").write_text("abcd")
    tok = Tokenizer.train_char("abc\n")
    with pytest.raises(TokenizerError, match=r"a document has characters .*'d' \(U\+0064\) at 3"):
        prepare(str(tmp_path / "c.txt"), tok, tmp_path / "ds", num_proc=1)
    with pytest.raises(DataError, match="not a usable token dataset"):
        ShardedTokens(tmp_path / "ds", "train")


# -- samplers ---------------------------------------------------------------------
TOKENS = np.arange(1000, dtype=np.uint16)  # token i == position i: windows are easy to read


def assert_windows(x, y, tokens, block_size, batch_size):
    assert x.shape == y.shape == (batch_size, block_size)
    assert x.dtype == y.dtype == np.int32
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert np.array_equal(row_x, tokens[start:start + block_size])
        assert np.array_equal(row_y, tokens[start + 1:start + block_size + 1])  # y[t] == x[t + 1]


def test_random_windows_are_shifted_pairs_and_reproducible():
    sampler = RandomWindows(TOKENS, block_size=16, batch_size=8, seed=3)
    x, y = sampler.batch(7)
    assert_windows(x, y, TOKENS, 16, 8)
    for step in range(7):
        sampler.batch(step)
    fresh = RandomWindows(TOKENS, block_size=16, batch_size=8, seed=3)
    assert np.array_equal(fresh.batch(7)[0], x)  # random access: no replay needed
    assert not np.array_equal(fresh.batch(8)[0], x)
    assert not np.array_equal(RandomWindows(TOKENS, 16, 8, seed=4).batch(7)[0], x)
    # the last possible window is reachable and never overruns the stream
    starts = np.concatenate([RandomWindows(TOKENS[:18], 16, 64, seed=0).batch(s)[0][:, 0] for s in range(4)])
    assert set(starts.tolist()) == {0, 1}


def test_sliding_windows_epochs():
    sampler = SlidingWindows(TOKENS, block_size=16, batch_size=5, stride=8, seed=0)
    assert np.array_equal(sampler.starts, np.arange(0, 1000 - 16, 8))  # seed 003's range
    assert sampler.steps_per_epoch == len(sampler.starts) // 5
    epoch = [sampler.batch(s) for s in range(sampler.steps_per_epoch)]
    for x, y in epoch:
        assert_windows(x, y, TOKENS, 16, 5)
    seen = np.concatenate([x[:, 0] for x, _ in epoch])
    assert len(set(seen.tolist())) == len(seen) and np.all(seen % 8 == 0)  # each window once
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    next_epoch = np.concatenate([sampler.batch(sampler.steps_per_epoch + s)[0][:, 0] for s in range(3)])
    assert not np.array_equal(next_epoch, seen[:15])
    fresh = SlidingWindows(TOKENS, 16, 5, 8, seed=0)
    assert np.array_equal(fresh.batch(sampler.steps_per_epoch + 1)[0], sampler.batch(sampler.steps_per_epoch + 1)[0])
    assert np.array_equal(fresh.batch(2)[0], epoch[2][0])

    ordered = SlidingWindows(TOKENS, 16, 5, 8, seed=0, shuffle=False)
    assert np.array_equal(ordered.batch(1)[0][:, 0], [40, 48, 56, 64, 72])


def test_corpus_shorter_than_a_block():
    with pytest.raises(DataError, match=r"the val split has 16 tokens, but a window of block_size 16 needs 17"):
        RandomWindows(np.arange(16), block_size=16, batch_size=2, seed=0, split="val")
    with pytest.raises(DataError, match=r"the train split has 40 tokens: 3 windows .* fewer than one batch of 4"):
        SlidingWindows(np.arange(40), block_size=16, batch_size=4, stride=8, seed=0)
    with pytest.raises(DataError, match="the val split has 0 tokens"):
        eval_batches(np.zeros(0, np.uint16), block_size=4, batch_size=2, n_batches=1, seed=0)


def test_eval_batches_are_fixed():
    first = eval_batches(TOKENS, block_size=8, batch_size=4, n_batches=3, seed=1)
    second = eval_batches(TOKENS, block_size=8, batch_size=4, n_batches=3, seed=1)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert_windows(x1, y1, TOKENS, 8, 4)


def test_pad_batch():
    x, y, valid = pad_batch([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9]], block_size=4, pad_id=0)
    assert np.array_equal(x, [[5, 6, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0]])
    assert np.array_equal(y, [[6, 7, -1, -1], [2, 3, 4, 5], [9, -1, -1, -1]])
    assert np.array_equal(valid, y != IGNORE_INDEX)
    assert x.dtype == y.dtype == np.int32 and valid.dtype == bool
    with pytest.raises(DataError, match="sequence 1 has 1 token"):
        pad_batch([[1, 2], [3]], block_size=4, pad_id=0)


def gpt2_shaped_tokenizer_json() -> bytes:
    """A byte-level BPE tokenizer.json with GPT-2's size and eos: the 256
    byte symbols, filler tokens, <|endoftext|> at 50256 (no merges)."""
    from tokenizers import decoders, models, pre_tokenizers

    from gptcore.tokenizer import _BYTE_CHAR
    vocab = {c: i for i, c in enumerate(_BYTE_CHAR.values())}
    vocab |= {f"filler{i}": i for i in range(len(vocab), 50256)}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    return hf.to_str().encode("utf-8")


def test_gpt2_tokenizer_is_downloaded_once_and_offline_names_the_way_out(tmp_path, monkeypatch, capsys):
    """data.tokenizer=gpt2 fetches GPT-2's tokenizer.json into the cache
    (checked: 50,257 tokens, <|endoftext|> last), reuses it, and gives eos;
    offline it is one line naming data.tokenizer=PATH; that PATH works too."""
    from jaxgpt import train
    fetched = []
    monkeypatch.setattr(corpus, "_urlopen_fetch", lambda url: fetched.append(url) or gpt2_shaped_tokenizer_json())
    path = corpus.download_gpt2_tokenizer(tmp_path)
    assert corpus.download_gpt2_tokenizer(tmp_path) == path and fetched == [corpus.GPT2_TOKENIZER_URL]
    tok = Tokenizer.load(path)
    assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.decode(tok.encode("Hi there")) == "Hi there"

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    base = ["--config", "debug", f"data.corpus={text}", f"data.cache_dir={tmp_path}", "model.vocab_size=auto",
            "--print-config"]
    for spec in ("gpt2", str(path)):
        assert train.main([*base, f"data.tokenizer={spec}"]) == 0
        assert "vocab_size = 50257" in capsys.readouterr().out

    def offline(url):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(corpus, "_urlopen_fetch", offline)
    assert train.main([*base, f"data.cache_dir={tmp_path / 'empty'}", "data.tokenizer=gpt2"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "data.tokenizer=PATH" in err and err.count("\n") == 1
    assert train.main([*base, "data.tokenizer=gpt3"]) == 2
    assert "tokenizer: must be one of char, bpe, gpt2 or the path of a tokenizer.json" in capsys.readouterr().err
