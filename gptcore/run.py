"""A training run, resolved once and frozen before anything runs or is written.

    args = parse_args(argv, "python -m jaxgpt.train")
    run  = resolve(args.config, args.overrides, args.resume)   # Run: what to train, from what, into where

`resolve` reads the preset (or, with --resume, the run's saved config.json)
and the overrides, checks the output directory and settles the tokenizer
and the model config:

    mode       tokenizer                                 model config
    fresh      data.tokenizer (char / bpe: trained on    [model] with vocab_size from the tokenizer
               the corpus as it streams by)
    resume     OUT_DIR/tokenizer.json                    the saved config.json's
    finetune   the source model directory's              the source's, [model] dropout rates on top

It writes nothing: the training loop (gptcore.loop) writes every file of the
run directory itself, after the twin's engine has been built.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptcore.budget import check_fits
from gptcore.cli import Parser
from gptcore.config import ConfigError, ModelConfig
from gptcore.corpus import corpus_from_spec, download_gpt2_tokenizer
from gptcore.data import DataError
from gptcore.documents import pieces, source_sha256, source_stamp
from gptcore.errors import RunError
from gptcore.lock import LOCK_FILE
from gptcore.loggers import check_loggers
from gptcore.model_dir import (
    MODEL_WEIGHTS,
    CheckpointError,
    find_model_dir,
    read_model_config,
    tokenizer_path,
)
from gptcore.presets import (
    apply_override,
    build_section,
    load_sections,
    preset_names,
    preset_summary,
    to_toml,
)
from gptcore.tokenizer import FILENAME as TOKENIZER_FILE
from gptcore.tokenizer import Tokenizer
from gptcore.train_config import DataConfig, TrainConfig

DEFAULT_PRESET = "default"
CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "fingerprint.json"  # what defines a run: --resume refuses a run that changed
OUTPUTS = (CONFIG_FILE, "checkpoints", "model", "metrics.jsonl")  # a fresh run refuses a directory holding any
DROPOUT_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "mlp_dropout")
MODES = ("fresh", "resume", "finetune")


@dataclass(frozen=True)
class Run:
    """Everything a trainer needs to know about a run, settled up front."""
    mode: str  # one of MODES
    out_dir: Path
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    tokenizer: Tokenizer
    init_from: Path | None  # finetune: the model directory whose weights the run starts from

    def to_dict(self) -> dict:
        """config.json of the run directory."""
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "data": self.data.to_dict()}


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """The command line both trainers take."""
    presets = "\n".join(f"  {name:<26} {preset_summary(name)}" for name in preset_names())
    parser = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Train a GPT. With no arguments: seed001_mini's architecture with nanoGPT's CPU "
                                "recipe on the offline Shakespeare corpus (configs/default.toml).",
                    epilog=f"presets (--config NAME, or a TOML file of your own):\n{presets}\n\n"
                           f"Every key and its value for a run: {prog} --config NAME [overrides] --print-config")
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name or TOML file (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    parser.add_argument("--print-config", action="store_true",
                        help="print the run's whole config (every section, defaults included) as TOML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.n_layers=2 train.lr=3e-4")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    return parser.parse_intermixed_args(argv)


def resolve(preset: str | None, overrides: list[str], resume: bool = False, check_out: bool = True) -> Run:
    """The run a command line asks for (see the module docstring); one-line
    UserErrors for anything that cannot work, before any file is written.
    check_out=False skips the output directory's checks (--print-config)."""
    tables, source = _tables(preset, overrides, resume)
    train = build_section("train", tables.get("train", {}), source)
    data = build_section("data", tables.get("data", {}), source)
    out_dir = Path(train.out_dir).expanduser()
    if check_out:
        check_out_dir(out_dir, resume)
    if not data.tokens:
        source_stamp(data.corpus)  # a corpus that is not there: one line now, before a tokenizer is trained
    if resume:
        tokenizer = Tokenizer.load(out_dir / TOKENIZER_FILE)
        run = Run("resume", out_dir, model_config(tables, tokenizer.vocab_size, source), train, data, tokenizer,
                  None)
        check_fingerprint(run)
        return run
    if train.init_from is not None:
        source_dir = find_model_dir(train.init_from, MODEL_WEIGHTS)
        loaded = read_model_config(source_dir)
        path = tokenizer_path(source_dir)
        if path is None:
            raise CheckpointError(f"{train.init_from}: no tokenizer.json to fine-tune with")
        tokenizer = Tokenizer.load(path)
        if data.tokens and make_tokenizer(data).fingerprint != tokenizer.fingerprint:
            raise RunError(f"data.tokens={data.tokens} was encoded with another tokenizer than {train.init_from}'s: "
                           f"prepare it with data.tokenizer={path}")
        return Run("finetune", out_dir, finetune_config(loaded, tables), train, data, tokenizer, source_dir)
    tokenizer = make_tokenizer(data)
    return Run("fresh", out_dir, model_config(tables, tokenizer.vocab_size, source), train, data, tokenizer, None)


def make_tokenizer(data: DataConfig) -> Tokenizer:
    """A fresh run's (and jaxgpt.prepare's) tokenizer: a token dataset's own
    (data.tokens), trained on the corpus's documents as they stream by (char,
    bpe), GPT-2's, or a tokenizer.json file."""
    if data.tokens:
        from gptcore.shards import read_manifest
        read_manifest(Path(data.tokens).expanduser(), verify=True)  # a usable dataset, or one line saying why not
        return Tokenizer.load(Path(data.tokens).expanduser() / TOKENIZER_FILE)
    if data.tokenizer == "char":
        return Tokenizer.train_char(_texts(data))
    if data.tokenizer == "bpe":
        return Tokenizer.train_bpe(_texts(data), data.bpe_vocab_size)
    if data.tokenizer == "gpt2":
        return Tokenizer.load(download_gpt2_tokenizer(Path(data.cache_dir).expanduser()))
    return Tokenizer.load(Path(data.tokenizer).expanduser())


def _texts(data: DataConfig) -> Iterator[str]:
    """The corpus's documents, for training a tokenizer on (those over 64 MB,
    a .txt read as it streams, in pieces); one line if there is no text."""
    empty = True
    for text, _, _ in pieces(data.corpus, data.text_field, data.cache_dir, size=64 << 20):
        empty = empty and not text.strip()
        yield text
    if empty:
        raise DataError(f"the corpus {data.corpus} is empty")


def resolve_checked(preset: str | None, overrides: list[str], resume: bool = False) -> Run:
    """resolve, then the memory check (gptcore.budget): a run that cannot fit
    the machine stops here, before anything is built."""
    run = resolve(preset, overrides, resume)
    check_fits(run.model, run.train)
    check_loggers(run.train)
    warn_unused_vocab(run)  # a run that goes ahead
    return run


def _tables(preset: str | None, overrides: list[str], resume: bool) -> tuple[dict, str]:
    """The raw config tables and where they came from: the preset with the
    overrides, or with --resume the saved config.json with the overrides on top."""
    tables = load_sections(preset, overrides)
    if not resume:
        return tables, str(preset)
    out_dir = build_section("train", tables.get("train", {}), str(preset)).out_dir
    saved = Path(out_dir).expanduser() / CONFIG_FILE
    if not saved.is_file():
        raise RunError(f"--resume: no {CONFIG_FILE} in {out_dir} (nothing to resume)")
    try:
        tables = json.loads(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"--resume: {saved} is not a run's config ({e})") from None
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise RunError(f"--resume: {saved} is not a run's config (a JSON object of sections, each an object)")
    for text in overrides:
        apply_override(tables, text)
    return tables, f"{out_dir}/{CONFIG_FILE}"


VOCAB_PAD_MARGIN = 128  # padding a vocabulary up to this many unused rows (a multiple of 64, ...) is quiet


def model_config(tables: dict, vocab_size: int, source: str = "config") -> ModelConfig:
    """The [model] section with vocab_size taken from the tokenizer (absent
    or "auto"): a preset may pad the vocabulary (a larger vocab_size; see
    warn_unused_vocab) but never truncate it."""
    table = dict(tables.get("model", {}))
    given = table.get("vocab_size")
    if given is None or given == "auto":
        given = vocab_size
    elif isinstance(given, int) and given < vocab_size:
        raise ConfigError(f"{source}: model.vocab_size = {given} is smaller than the tokenizer's "
                          f"{vocab_size} tokens (pass model.vocab_size=auto to take the tokenizer's)")
    table["vocab_size"] = given
    return build_section("model", table, source)


def warn_unused_vocab(run: Run) -> None:
    """One warning line when the model's vocabulary has more than
    VOCAB_PAD_MARGIN rows its tokenizer never uses, with their cost."""
    cfg, unused = run.model, run.model.vocab_size - run.tokenizer.vocab_size
    if unused > VOCAB_PAD_MARGIN:
        params = unused * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        print(f"warning: model.vocab_size = {cfg.vocab_size} leaves {unused:,} of its rows unused by the "
              f"{run.tokenizer.vocab_size}-token tokenizer: {params / 1e6:,.1f}M parameters, "
              f"{16 * params / 2**20:,.0f} MiB of weights, gradients and Adam moments (model.vocab_size=auto "
              f"drops them)", file=sys.stderr)


def finetune_config(loaded: ModelConfig, tables: dict) -> ModelConfig:
    """A fine-tuned model keeps the architecture it was trained with; only
    the dropout rates of an explicit [model] table apply."""
    table = tables.get("model", {})
    return loaded.replace(**{k: table[k] for k in DROPOUT_FIELDS if k in table})


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """A fresh run never writes over a previous run or a user's files; a
    resumed one needs a checkpoint. Each refusal names the way out."""
    checkpoints = out_dir / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(checkpoints.iterdir())
    if resume:
        if not has_checkpoint:
            raise RunError(f"--resume: no checkpoint in {checkpoints} (the run stopped before its first one): "
                           f"start afresh in another train.out_dir (e.g. train.out_dir={free_name(out_dir)}), "
                           f"or delete {out_dir} and run again")
        return
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing and has_checkpoint:
        raise RunError(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with --resume, or "
                       f"start another with train.out_dir={free_name(out_dir)}")
    if existing:
        raise RunError(f"{out_dir} holds a run that saved no checkpoint ({', '.join(existing)}): start afresh "
                       f"with train.out_dir={free_name(out_dir)}, or delete {out_dir} and run again")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise RunError(f"{out_dir} is not empty ({shown}): a new run writes only into an empty or new "
                           f"directory, e.g. train.out_dir={free_name(out_dir)}")


def fingerprint(run: Run) -> dict:
    """What defines a run beyond its step: the model config, the tokenizer
    and the corpus it trains on (written at its start, in FINGERPRINT_FILE)."""
    return json.loads(json.dumps({  # as it reads back (tuples become lists)
        "model": run.model.to_dict(), "tokenizer_sha256": run.tokenizer.fingerprint, "corpus": run.data.corpus,
        "source_sha256": _data_sha256(run)}))


def _data_sha256(run: Run) -> str:
    """The sha256 of a token dataset's manifest (its files' checksums within),
    or of the corpus's files' names, sizes and modification times."""
    if run.data.tokens:
        return hashlib.sha256((Path(run.data.tokens).expanduser() / "manifest.json").read_bytes()).hexdigest()
    return source_sha256(run.data.corpus)


def _same_data(saved: dict, now: dict, run: Run) -> bool:
    if "source_sha256" in saved or run.data.tokens:  # (a token dataset's hash had the older name)
        return saved.get("source_sha256", saved.get("corpus_sha256")) == now["source_sha256"]
    # a run started before token datasets: its fingerprint holds the sha256 of the corpus text
    text = corpus_from_spec(run.data.corpus, Path(run.data.cache_dir).expanduser())
    return saved.get("corpus_sha256") == hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_fingerprint(run: Run) -> None:
    """--resume of a run whose config.json, tokenizer.json or corpus changed
    since it started: one line saying what changed (a run from before
    fingerprints has none to compare)."""
    path = run.out_dir / FINGERPRINT_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"--resume: {path} is unreadable ({e})") from None
    now = fingerprint(run)
    if not isinstance(saved, dict):
        raise RunError(f"--resume: {path} is not a run's fingerprint")
    if saved.get("model") != now["model"]:
        old = saved.get("model") if isinstance(saved.get("model"), dict) else {}
        changes = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in now["model"].items() if old.get(k) != v]
        raise RunError(f"--resume: the model changed since the run started ({', '.join(changes) or 'fields'}): "
                       f"resume with the config it started with, or start a new run")
    if saved.get("tokenizer_sha256") != now["tokenizer_sha256"]:
        raise RunError(f"--resume: {run.out_dir / TOKENIZER_FILE} changed since the run started (its sha256 "
                       f"differs): the run's token ids would no longer mean what they meant")
    if not _same_data(saved, now, run):
        was = "" if saved.get("corpus") == run.data.corpus else f", was {saved.get('corpus')!r}"
        raise RunError(f"--resume: the corpus changed since the run started (data.corpus = {run.data.corpus!r}"
                       f"{was}; its files differ): resume on the same text, or start a new run")


def free_name(out_dir: Path) -> str:
    """The first of OUT-2, OUT-3, ... that does not exist: a new run directory to suggest."""
    n = 2
    while out_dir.with_name(f"{out_dir.name}-{n}").exists():
        n += 1
    return str(out_dir.with_name(f"{out_dir.name}-{n}"))


def print_config(args: argparse.Namespace) -> None:
    """--print-config: the resolved run's config as TOML on stdout; as a
    --config file it gives the same run."""
    run = resolve(args.config, args.overrides, args.resume, check_out=False)
    warn_unused_vocab(run)
    print(to_toml(run.to_dict()), end="")
