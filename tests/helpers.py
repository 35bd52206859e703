"""What several test modules share: the repository and data paths, and a
tiny run preset written to disk (a corpus file and a TOML preset)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def tiny_preset(root: Path, chars: int, model: dict, train: dict) -> Path:
    """root/corpus.txt (the first `chars` characters of tiny Shakespeare) and
    root/tiny.toml, a preset with these [model] and [train] tables training on
    it; returns the preset's path."""
    corpus = root / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    lines = []
    for section, table in {"model": model, "train": train, "data": {"corpus": str(corpus)}}.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    path = root / "tiny.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)
