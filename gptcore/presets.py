"""Named presets: TOML files in `configs/` that only override defaults.

A preset file has one table per section (`[model]` here; the trainer adds its
own sections). Keys a section does not know and values of the wrong type are
errors that name the file and the key. `key=value` overrides use dotted paths
(`model.n_layers=2`) and TOML value syntax (`train.lr=3e-4`, `model.mlp="gelu"`;
a bare word is read as a string).
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path

from gptcore.config import ConfigError, ModelConfig
from gptcore.errors import check_regular_file
from gptcore.train_config import DataConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# section name -> dataclass of a preset's [section] table.
SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def preset_summary(name: str) -> str:
    """The first clause of a preset's opening comment (up to the first ": "
    or ". " outside parentheses)."""
    lines = (CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    text = " ".join(line.lstrip("# ") for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch in ".:" and text[i + 1:i + 2] in (" ", ""):
            text = text[:i]
            break
    return text if len(text) <= 80 else text[:79] + "…"


def to_toml(tables: dict[str, dict]) -> str:
    """Config sections as a TOML preset (None values left out: they are the defaults)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)
    lines = []
    for section, table in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def resolve_preset(name_or_path: str | Path) -> Path:
    """`seed001_mini`, `configs/seed001_mini.toml` or any path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"no config file {str(path)!r} (presets: {', '.join(preset_names())})")
    return path


def parse_override(text: str) -> tuple[list[str], object]:
    """`model.d_model=64` -> (["model", "d_model"], 64)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if len(keys) != 2 or not all(keys):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. model.n_layers")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def load_sections(name_or_path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> dict[str, dict]:
    """The raw tables of a preset with overrides applied (no dataclasses built)."""
    tables: dict[str, dict] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_preset(name_or_path)
        source = str(path)
        try:
            tables = tomllib.loads(check_regular_file(path, "config file", 2**20).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid TOML ({e})") from None
    for section, table in tables.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a table")
    for text in overrides:
        apply_override(tables, text)
    return tables


def apply_override(tables: dict, text: str) -> dict:
    """Set one `section.key=value` override in raw tables (in place)."""
    (section, key), value = parse_override(text)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}")
    tables.setdefault(section, {})[key] = value
    return tables


def build_section(section: str, table: dict, source: str = "config"):
    """The dataclass of `section` from a table, with one-line errors naming the key."""
    cls = SECTIONS[section]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {section}.{key}")
    try:
        return cls(**table)
    except ConfigError as e:
        raise ConfigError(f"{source}: {section}.{e}") from None


def load_config(name_or_path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> dict[str, object]:
    """Every registered section of a preset, as dataclasses."""
    tables = load_sections(name_or_path, overrides)
    source = str(name_or_path) if name_or_path is not None else "defaults"
    return {s: build_section(s, tables.get(s, {}), source) for s in SECTIONS}


def load_model_config(name_or_path: str | Path | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    tables = load_sections(name_or_path, [o for o in overrides if o.startswith("model.")])
    source = str(name_or_path) if name_or_path is not None else "defaults"
    return build_section("model", tables.get("model", {}), source)
