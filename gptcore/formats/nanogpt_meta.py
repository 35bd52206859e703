"""nanoGPT's character vocabulary (data/<dataset>/meta.pkl) as our tokenizer.

nanoGPT's prepare.py pickles {"vocab_size", "itos", "stoi"} for char-level
datasets, ids in sorted character order, and sample.py reads it beside the
data. A pickle can carry code, so it is read with an unpickler that resolves
no globals at all: dicts, lists, strings and numbers load, anything that
names a class or function (the way a malicious pickle runs code) is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from gptcore.formats import FormatError
from gptcore.tokenizer import Tokenizer


class _DataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (meta.pkl holds data only)")


def find_meta(ckpt: dict, ckpt_path: Path) -> Path | None:
    """Where sample.py would find meta.pkl: data/<dataset>/ of the nanoGPT
    checkout (the checkpoint's out_dir sits beside data/), or beside ckpt.pt."""
    dataset = (ckpt.get("config") or {}).get("dataset") if isinstance(ckpt.get("config"), dict) else None
    candidates = [ckpt_path.parent / "meta.pkl"]
    if isinstance(dataset, str) and dataset and "/" not in dataset and dataset not in (".", ".."):
        candidates += [root / "data" / dataset / "meta.pkl" for root in (ckpt_path.parent.parent, Path.cwd())]
    return next((p for p in candidates if p.is_file()), None)


def read_meta(path: Path) -> Tokenizer:
    """The char tokenizer of a nanoGPT meta.pkl; FormatError (one line) for a
    pickle with code in it or a vocabulary our char tokenizer cannot match."""
    try:
        meta = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # UnpicklingError, EOFError, ...: truncated, foreign or hostile
        raise FormatError(f"{path}: not a nanoGPT meta.pkl we can read ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]})") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or not itos or sorted(itos) != list(range(len(itos))):
        raise FormatError(f"{path}: no character vocabulary (itos with ids 0..n-1)")
    chars = [itos[i] for i in range(len(itos))]
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or chars != sorted(set(chars)):
        raise FormatError(f"{path}: itos is not one character per id in sorted order (nanoGPT's char layout)")
    return Tokenizer.train_char("".join(chars))
