"""`python -m jaxgpt.convert SRC DST ...`: checkpoint conversion between
jaxgpt / torchgpt model directories, .pt, safetensors, Hugging Face and
nanoGPT. The converter is framework-free and lives in
gptcore/formats/convert.py; this entry point is where the README names it,
and adds what needs a framework: --verify runs both sides with JAX on
fixed token sequences and compares their logits (that transformers reads
our Hugging Face exports as we do is the parity suite's part).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gptcore.formats import FormatError
from gptcore.formats import convert as formats
from gptcore.formats.convert import convert, read_pt  # noqa: F401  (the public entry points)

VERIFY_SEQUENCES, VERIFY_LENGTH = 4, 32  # fixed token sequences (seed 0) both sides run


def logits_of(path: Path, ids: np.ndarray) -> np.ndarray:
    """float32 logits (B, T, V) of the model at path (any format convert reads), run by jaxgpt."""
    from jaxgpt.model import GPT, load_state_arrays
    ckpt = formats.READERS[formats.source_format(path)](path)
    params = load_state_arrays({k: np.asarray(v, np.float32) for k, v in ckpt.tensors.items()}, ckpt.cfg)
    return np.asarray(GPT(ckpt.cfg).apply({"params": params}, ids).logits, np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, mean KL(softmax a || softmax b) per position)."""
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    return float(np.abs(a - b).max()), float((np.exp(la) * (la - lb)).sum(-1).mean())


def verify(src: Path, dst: Path, tolerance: float) -> str:
    """Both sides on the same sequences: a line of the differences, or a
    FormatError naming them when the largest exceeds tolerance."""
    cfg = formats.READERS[formats.source_format(src)](src).cfg
    length = min(VERIFY_LENGTH, cfg.context_length)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (VERIFY_SEQUENCES, length), dtype=np.int32)
    reference = logits_of(src, ids)
    sides = {"jaxgpt": logits_of(dst, ids)}
    lines = []
    for name, got in sides.items():
        if got.shape != reference.shape:
            raise FormatError(f"--verify: DST ({name}) gives logits of shape {got.shape}, SRC {reference.shape}")
        diff, kl = compare(reference, got)
        lines.append(f"{name}: max |logit difference| {diff:.3g}, mean KL {kl:.3g}")
        if not diff <= tolerance:
            raise FormatError(f"--verify: DST differs from SRC ({lines[-1]} on {VERIFY_SEQUENCES} sequences of "
                              f"{length} tokens; tolerance {tolerance:g})")
    return f"verified on {VERIFY_SEQUENCES} sequences of {length} tokens: " + "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    return formats.main(argv, verify=verify)


if __name__ == "__main__":
    sys.exit(main())
