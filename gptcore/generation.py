"""What both twins' generators share: sampling settings and the CLI.

This module imports neither JAX nor PyTorch. `jaxgpt.generate` and
`torchgpt.generate` validate their sampling arguments with `check_sampling`
and run the same command line through `run_cli`, each passing its own model
loader and token stream, so the two CLIs cannot drift apart.

Sampling conventions (identical in both twins' `filter_logits`), applied in
HF's order temperature -> top-k -> top-p:

- temperature 0 is greedy decoding: the argmax, the lowest index among ties
  (top-k and top-p cannot change the argmax, so they are ignored);
- top-k keeps every token whose logit is >= the k-th largest logit, so tokens
  tied with the k-th are all kept (nanoGPT and HF's TopKLogitsWarper do the
  same; it needs no tie-breaking order, which torch.topk does not define);
- top-p keeps the smallest set of most probable tokens whose cumulative
  probability reaches p, INCLUDING the token that crosses p (HF's
  convention), plus every token tied with the last one kept.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TextIO

from gptcore.cli import Parser, guarded
from gptcore.errors import UserError, check_regular_file
from gptcore.model_dir import load_with_tokenizer
from gptcore.tokenizer import Tokenizer

STREAM_CHUNK = 16  # tokens decoded per compiled segment between prints


class GenerationError(UserError):
    """Sampling settings or a request the generator cannot serve; the message says why."""


class Sampling(NamedTuple):
    """Validated sampling settings; top_k / top_p are None when they filter nothing."""
    temperature: float
    top_k: int | None
    top_p: float | None


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Sampling:
    """Validate and normalise: top_k 0 and top_p 1 mean "off" and become None."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    return Sampling(float(temperature), top_k or None, None if top_p is None or top_p == 1.0 else float(top_p))


def check_request(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    """The one-shot generators keep every token in the KV cache at its own
    position, so prompt + new tokens must fit the model's context."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_len < 1:
        raise GenerationError("every prompt needs at least one token")
    if prompt_len + max_new_tokens > context_length:
        raise GenerationError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's context_length "
            f"{context_length}; use stream() (or the CLI), which slides the context window")


def start_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids to generate from. An empty prompt starts from the end-of-text
    token when the tokenizer has one ("[eos]", as between seed 002's documents),
    else from a newline (seed 001 samples from "\\n")."""
    if text:
        return tokenizer.encode(text, what="prompt")
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    newline = tokenizer.token_to_id("\n")
    if newline is None:
        raise GenerationError("empty prompt, and the tokenizer has neither an [eos] token nor '\\n' to start from")
    return [newline]


class TextStreamer:
    """Prints the text of a growing id sequence as it grows.

    Each print decodes the whole sequence and writes what is new, holding back
    a trailing U+FFFD: byte-level BPE may split one character over tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids = list(prompt_ids)
        self.printed = len(tokenizer.decode(self.ids))

    def put(self, new_ids: Iterable[int], final: bool = False) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        if end > self.printed:
            self.out.write(text[self.printed:end])
            self.out.flush()
            self.printed = end


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Sample text from a model directory, streamed to stdout.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory (config.json, weights, tokenizer.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help='prompt text; "-" reads it from stdin (default: empty)')
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, one after another")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    return p


MAX_PROMPT_BYTES = 16 * 2**20  # far beyond any context; a larger file is a mistake


def read_prompt(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.prompt_file is not None:
        check_regular_file(args.prompt_file, "prompt file", MAX_PROMPT_BYTES)
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    return stdin.read() if args.prompt == "-" else args.prompt


# (model directory) -> (model config, whatever `stream` takes as its model, tokenizer.json path or None)
Loader = Callable[[str], tuple]
# (model, prompt ids, max_new_tokens, sampling, eos_id, seed) -> chunks of new ids, eos last if emitted
Streamer = Callable[..., Iterable[list[int]]]


def run_cli(argv: Sequence[str] | None, prog: str, load: Loader, stream: Streamer) -> int:
    """The `python -m {jaxgpt,torchgpt}.generate` command; returns the exit status.

    Prints the prompt, then each sample's text as it is generated; samples are
    separated by a dashed line. Bad input: `error: ...` on stderr, status 2.
    """
    args = build_parser(prog).parse_args(argv)
    out = sys.stdout

    def body():
        sampling = check_sampling(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.num_samples < 1:
            raise GenerationError(f"--num-samples must be >= 1, got {args.num_samples}")
        text = read_prompt(args, sys.stdin)
        cfg, model, tokenizer = load_with_tokenizer(load, args.checkpoint)
        prompt_ids = start_ids(tokenizer, text)
        try:
            for i in range(args.num_samples):
                if i:
                    out.write("\n---------------\n")
                out.write(text)
                out.flush()
                printer = TextStreamer(tokenizer, prompt_ids, out)
                for chunk in stream(model, prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                    eos_id=tokenizer.eos_id, seed=args.seed + i):
                    printer.put([t for t in chunk if t != tokenizer.eos_id])
                printer.put([], final=True)
        except KeyboardInterrupt:  # Ctrl-C while sampling ends the text where it is
            out.write("\n")
            raise
        out.write("\n")
        out.flush()

    return guarded(body)
