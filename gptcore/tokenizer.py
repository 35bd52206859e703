"""Tokenizers shared by both twins, each stored as one HF `tokenizer.json`.

Three kinds, told apart by the json:

- "char" (WordLevel): one id per character, ids in sorted character order as in
  nanoGPT's shakespeare_char (tiny Shakespeare: 65 ids, '\\n' = 0, ' ' = 1).
  A pre-tokenizer isolates every character and the `Fuse` decoder joins them
  with nothing in between, so the json alone reproduces the tokenizer.
- "bpe" (BPE with a ByteLevel pre-tokenizer): byte-level BPE as in seed 002
  and GPT-2 (`add_prefix_space=True` or not), Llama 3 and most recent models.
- "hf": any other tokenizer.json, e.g. Llama 2's and Mistral's SentencePiece
  BPE (Metaspace, byte fallback) or a WordLevel / WordPiece / Unigram model:
  encoded and decoded exactly as `tokenizers` does with that file (special
  tokens not added), so a model imported from Hugging Face trains on its own ids.

For "char" and "bpe", `decode(encode(s)) == s` for every string `s`, and no
character is ever dropped: text the vocabulary cannot spell raises
`TokenizerError`. An "hf" tokenizer handles unknown text as its file says
(an unk token, byte fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptcore.errors import UserError

FILENAME = "tokenizer.json"
_MAX_REPORTED = 5  # distinct unknown characters named in one error message


class TokenizerError(UserError):
    """A tokenizer that cannot be built or loaded, or text it cannot encode."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHAR = _bytes_to_unicode()


EOS_TOKENS = ("[eos]", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>")  # the first a tokenizer has is its eos


class Tokenizer:
    """A char, byte-level BPE or other ("hf") tokenizer around an HF `tokenizers.Tokenizer`.

    `hf` is the tokenizer exactly as saved to tokenizer.json; it is not modified.
    """

    def __init__(self, hf: tokenizers.Tokenizer):
        spec = json.loads(hf.to_str())
        self.hf = hf
        self.kind: str = _kind(spec, hf)
        self._specials = [t["content"] for t in spec["added_tokens"]]
        self._special_re = (re.compile("|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))))
                            if self._specials else None)
        # Encoding goes through a copy: padding or truncation left on in a
        # tokenizer.json (seed 002 enables padding) would corrupt token streams.
        spec["padding"] = spec["truncation"] = None
        vocab = hf.get_vocab(with_added_tokens=False)
        self._prefix_space = False
        self._known_chars = frozenset(vocab) if self.kind == "char" else frozenset()
        self._known_bytes: frozenset[int] | None = None
        if self.kind == "bpe":
            pre = spec["pre_tokenizer"]
            # HF's add_prefix_space adds a space only when the text does not already
            # start with one, so " a" and "a" would encode alike. Encoding with the
            # flag off and adding the space ourselves keeps encode injective (and
            # identical to HF for text that does not start with a space). The
            # form hf_exact_json writes (a Prepend(" ") normalizer and a Strip
            # decoder) says the same, and HF then encodes every text as we do.
            self._prefix_space = bool(pre.get("add_prefix_space")) or _take_prefix_steps(spec)
            pre["add_prefix_space"] = False
            known = {b for b, c in _BYTE_CHAR.items() if c in vocab}
            # BPE without an unk token silently drops bytes it has no token for.
            self._known_bytes = None if len(known) == 256 else frozenset(known)
        self._encoder = tokenizers.Tokenizer.from_str(json.dumps(spec))

    # -- training ---------------------------------------------------------------
    @classmethod
    def train_char(cls, texts: str | Iterable[str], special_tokens: Sequence[str] = ()) -> "Tokenizer":
        """One id per distinct character of `texts`, in sorted order; any
        `special_tokens` get the ids after the characters."""
        chars: set[str] = set()
        for text in [texts] if isinstance(texts, str) else texts:
            chars.update(text)
        if not chars:
            raise TokenizerError("cannot train a char tokenizer on empty text")
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        # The unk token is deliberately absent from the vocabulary: HF then
        # raises instead of mapping unknown characters, and `encode` checks first.
        hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        if special_tokens:
            hf.add_special_tokens(list(special_tokens))
        return cls(hf)

    @classmethod
    def train_bpe(cls, texts: str | Iterable[str], vocab_size: int,
                  special_tokens: Sequence[str] = ("[pad]", "[eos]")) -> "Tokenizer":
        """Byte-level BPE as in seed 002, plus the full 256-byte initial alphabet
        (seed 002 omits it, and then bytes unseen in training, e.g. Chinese in an
        English corpus, vanish at encode time)."""
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise TokenizerError(f"vocab_size {vocab_size} is below the {floor} tokens byte-level BPE starts with "
                                 f"(256 bytes + {len(special_tokens)} special)")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer=trainer)
        return cls(hf)

    # -- persistence ------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a .json file, or a directory that gets
        a tokenizer.json); returns the file written."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        self.hf.save(str(tmp), pretty=True)
        os.replace(tmp, target)  # a reader never sees a half-written file
        return target

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json, given the file or the directory holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path}")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # HF raises a bare Exception for malformed json
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({reason})") from None
        return cls(hf)

    # -- encoding ---------------------------------------------------------------
    def encode(self, text: str, *, start: bool = True, what: str = "text") -> list[int]:
        """Token ids of `text`. `start`: the text begins a sequence, so byte-level
        BPE puts its prefix space in front (`decode(..., start=True)` removes it);
        pass False for text that continues a sequence. `what` names the text in
        the error raised for characters the vocabulary cannot spell."""
        self.check(text, what=what)
        return self._encoder.encode(self._with_prefix(text, start), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, start: bool = True) -> list[list[int]]:
        """`encode` of each text, in parallel."""
        for i, text in enumerate(texts):
            self.check(text, what=f"text {i} of the batch")
        encodings = self._encoder.encode_batch([self._with_prefix(t, start) for t in texts],
                                               add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], *, start: bool = True) -> str:
        """Text of `ids` (special tokens included). `start`: the ids begin a
        sequence, as `encode(..., start=True)` made them."""
        text = self._encoder.decode([int(i) for i in ids], skip_special_tokens=False)
        if self._prefix_space and start and text.startswith(" "):
            text = text[1:]
        return text

    def check(self, text: str, *, what: str = "text") -> None:
        """Raise a one-line TokenizerError naming every character of `text` (up to
        5, with positions) that the vocabulary cannot spell."""
        unknown = {c for c in set(text) if not self._knows(c)}
        if not unknown:
            return
        in_special = set()
        if self._special_re is not None:  # special tokens are matched before the vocabulary
            for m in self._special_re.finditer(text):
                in_special.update(range(*m.span()))
        positions: dict[str, list[int]] = {}
        for i, c in enumerate(text):
            if c in unknown and i not in in_special:
                positions.setdefault(c, []).append(i)
        if not positions:
            return
        parts = []
        for c, where in list(positions.items())[:_MAX_REPORTED]:
            at = ", ".join(map(str, where[:3])) + (f" (+{len(where) - 3} more)" if len(where) > 3 else "")
            parts.append(f"{c!r} (U+{ord(c):04X}) at {at}")
        if len(positions) > _MAX_REPORTED:
            parts.append(f"and {len(positions) - _MAX_REPORTED} more")
        raise TokenizerError(f"{what} has characters not in the tokenizer's vocabulary: {'; '.join(parts)}")

    def _knows(self, char: str) -> bool:
        if self.kind == "char":
            return char in self._known_chars
        return self._known_bytes is None or all(b in self._known_bytes for b in char.encode("utf-8"))

    def _with_prefix(self, text: str, start: bool) -> str:
        return " " + text if self._prefix_space and start and text else text

    # -- vocabulary -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    @property
    def pad_id(self) -> int | None:
        return self.hf.token_to_id("[pad]")

    @property
    def eos_id(self) -> int | None:
        """[eos] (ours), or GPT-2's <|endoftext|>."""
        for token in EOS_TOKENS:
            if (token_id := self.hf.token_to_id(token)) is not None:
                return token_id
        return None

    def hf_exact_json(self) -> str:
        """tokenizer.json text that `transformers` (AutoTokenizer) encodes
        exactly as `encode` does, every text included: a byte-level BPE
        with add_prefix_space (which HF skips for text already starting
        with a space) is written with the flag off, a normalizer that always
        prepends the space and a decoder that strips it. Any other
        tokenizer's file is returned as it is."""
        spec = json.loads(self.hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        if self.kind != "bpe" or not pre.get("add_prefix_space"):
            return self.hf.to_str(pretty=True)
        pre["add_prefix_space"] = False
        prepend = {"type": "Prepend", "prepend": " "}
        norm = spec.get("normalizer")
        spec["normalizer"] = prepend if norm is None else {"type": "Sequence", "normalizers": [norm, prepend]}
        strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        dec = spec.get("decoder")
        spec["decoder"] = strip if dec is None else {"type": "Sequence", "decoders": [dec, strip]}
        return tokenizers.Tokenizer.from_str(json.dumps(spec)).to_str(pretty=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json content: equal fingerprints, equal ids."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _kind(spec: dict, hf: tokenizers.Tokenizer) -> str:
    """ "char": a WordLevel model whose words are single characters; "bpe": a
    BPE model with a ByteLevel pre-tokenizer; "hf": anything else."""
    model_type = spec["model"]["type"]
    if model_type == "WordLevel" and all(len(w) == 1 for w in hf.get_vocab(with_added_tokens=False)):
        return "char"
    if model_type == "BPE" and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        return "bpe"
    return "hf"


def _take_prefix_steps(spec: dict) -> bool:
    """Remove hf_exact_json's Prepend(" ") normalizer and Strip decoder from
    spec (the encoder adds and removes the space itself, at the start of a
    sequence only); True when they were there."""
    prepend = {"type": "Prepend", "prepend": " "}
    norm, dec = spec.get("normalizer"), spec.get("decoder")
    if norm == prepend:
        spec["normalizer"] = None
    elif norm and norm.get("type") == "Sequence" and norm["normalizers"][-1:] == [prepend]:
        rest = norm["normalizers"][:-1]
        spec["normalizer"] = rest[0] if len(rest) == 1 else {**norm, "normalizers": rest}
    else:
        return False
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    if dec == strip:
        spec["decoder"] = None
    elif dec and dec.get("type") == "Sequence" and dec["decoders"][-1:] == [strip]:
        rest = dec["decoders"][:-1]
        spec["decoder"] = rest[0] if len(rest) == 1 else {**dec, "decoders": rest}
    return True
