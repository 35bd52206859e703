"""What both trainers share, framework-free: the command line, the run
directory, the tokenizer and token files, the batches of each step, early
stopping, metrics.jsonl and the loss plot.

A run directory (train.out_dir) holds

    config.json     every config section of the run ({"model": ..., "train": ..., "data": ...})
    tokenizer.json  the tokenizer the model was trained with
    data/           train.bin / val.bin / meta.json (gptcore.data.prepare_tokens)
    checkpoints/    the trainer's checkpoints (latest ones and the best by val loss)
    model/          the exported model directory (best params)
    metrics.jsonl   one JSON record per logged step / evaluation
    loss.png        train and val loss
    sample.txt      a sample from the final model
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.config import ConfigError, ModelConfig
from gptcore.data import (DataError, RandomWindows, SlidingWindows, corpus_from_spec, eval_batches,
                          load_tokens, prepare_tokens)
from gptcore.model_dir import CheckpointError
from gptcore.presets import SECTIONS, build_section, load_sections, parse_override
from gptcore.tokenizer import FILENAME as TOKENIZER_FILE, Tokenizer, TokenizerError
from gptcore.train_config import DataConfig, TrainConfig

DEFAULT_PRESET = "default"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
OUTPUTS = (CONFIG_FILE, "checkpoints", "model", METRICS_FILE)  # a fresh run refuses a directory holding any
DROPOUT_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout")
ERRORS = (ConfigError, DataError, TokenizerError, OSError)  # one-line errors of a run's setup


class RunError(ValueError):
    """A run that cannot start (existing outputs, nothing to resume, ...)."""


# -- command line -------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = _Parser(
        prog=prog, description="Train a GPT. With no arguments: the seed001_mini model on the offline "
                               "Shakespeare corpus (configs/default.toml).")
    parser.add_argument("--config", default=DEFAULT_PRESET, help="preset name or TOML file (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. model.n_layers=2 train.lr=3e-4")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    return parser.parse_intermixed_args(argv)


@dataclass
class RunConfig:
    model: ModelConfig | None  # None until the tokenizer (vocab size) or init_from is known
    train: TrainConfig
    data: DataConfig
    tables: dict  # the raw tables, to tell explicit values from defaults
    source: str = "config"  # the preset or config.json, for error messages

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "data": self.data.to_dict()}


def load_run_config(preset: str | None, overrides: list[str], resume: bool) -> RunConfig:
    """The run's config: the preset with overrides, or with --resume the saved
    config.json of train.out_dir with the overrides on top."""
    tables = load_sections(preset, overrides)
    train = build_section("train", tables.get("train", {}), str(preset))
    if resume:
        saved = Path(train.out_dir).expanduser() / CONFIG_FILE
        if not saved.is_file():
            raise RunError(f"--resume: no {CONFIG_FILE} in {train.out_dir} (nothing to resume)")
        try:
            tables = json.loads(saved.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"--resume: {saved} is not a run's config ({e})") from None
        if not isinstance(tables, dict):
            raise RunError(f"--resume: {saved} is not a run's config (not a JSON object)")
        for text in overrides:
            tables = _override(tables, text)
    source = f"{train.out_dir}/{CONFIG_FILE}" if resume else str(preset)
    return RunConfig(None, build_section("train", tables.get("train", {}), source),
                     build_section("data", tables.get("data", {}), source), tables, source)


def _override(tables: dict, text: str) -> dict:
    (section, key), value = parse_override(text)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}")
    tables.setdefault(section, {})[key] = value
    return tables


def model_config(tables: dict, vocab_size: int, source: str = "config") -> ModelConfig:
    """The [model] section with vocab_size taken from the tokenizer: a preset
    may pad the vocabulary (a larger vocab_size) but never truncate it."""
    table = dict(tables.get("model", {}))
    given = table.get("vocab_size")
    if given is not None and isinstance(given, int) and given < vocab_size:
        raise ConfigError(f"{source}: model.vocab_size = {given} is smaller than the tokenizer's "
                          f"{vocab_size} tokens (drop it from the preset to take the tokenizer's)")
    table["vocab_size"] = given if given is not None else vocab_size
    return build_section("model", table, source)


def finetune_config(loaded: ModelConfig, tables: dict) -> ModelConfig:
    """A fine-tuned model keeps the architecture it was trained with; only
    the dropout rates of an explicit [model] table apply."""
    table = tables.get("model", {})
    return loaded.replace(**{k: table[k] for k in DROPOUT_FIELDS if k in table})


def setup_model(out_dir: Path, cfg: RunConfig, text: str, resume: bool, load_model):
    """The run's tokenizer, and cfg.model set. Fine-tuning (train.init_from,
    not when resuming) reads the source with the twin's `load_model` and
    keeps its tokenizer and architecture; returns (tokenizer, the source's
    weights as load_model gives them, or None)."""
    loaded = None
    if cfg.train.init_from is not None and not resume:
        loaded = load_model(cfg.train.init_from)  # (config, weights, tokenizer.json or None)
        if loaded[2] is None:
            raise CheckpointError(f"{cfg.train.init_from}: no tokenizer.json to fine-tune with")
    tokenizer = setup_tokenizer(out_dir, cfg.data, text, resume, loaded[2] if loaded else None)
    if loaded:
        cfg.model = finetune_config(loaded[0], cfg.tables)
    else:
        cfg.model = model_config(cfg.tables, tokenizer.vocab_size, cfg.source)
    return tokenizer, loaded[1] if loaded else None


# -- run directory ------------------------------------------------------------------
def check_out_dir(out_dir: Path, resume: bool) -> None:
    """A fresh run never writes over a previous run or a user's files; a
    resumed one needs a checkpoint."""
    checkpoints = out_dir / "checkpoints"
    if resume:
        if not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            raise RunError(f"--resume: no checkpoint in {checkpoints} (nothing to resume)")
        return
    existing = [name for name in OUTPUTS if (out_dir / name).exists()]
    if existing:
        raise RunError(f"{out_dir} already holds a run ({', '.join(existing)}): pass --resume to continue it "
                       f"or choose another train.out_dir")


def setup_tokenizer(out_dir: Path, data: DataConfig, text: str, resume: bool,
                    pretrained: Path | None = None) -> Tokenizer:
    """The run's tokenizer: the saved OUT_DIR/tokenizer.json when resuming,
    the fine-tuned model's, or one trained on the corpus."""
    if resume:
        return Tokenizer.load(out_dir / TOKENIZER_FILE)
    if pretrained is not None:
        return Tokenizer.load(pretrained)
    if data.tokenizer == "char":
        return Tokenizer.train_char(text)
    return Tokenizer.train_bpe(text, data.bpe_vocab_size)


def load_corpus(data: DataConfig) -> str:
    return corpus_from_spec(data.corpus, Path(data.cache_dir).expanduser())


def prepare_data(out_dir: Path, data: DataConfig, text: str, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, val tokens), encoded once into OUT_DIR/data."""
    prepare_tokens(text, tok, out_dir / "data", data.val_fraction)
    return load_tokens(out_dir / "data", "train"), load_tokens(out_dir / "data", "val")


def write_run_files(out_dir: Path, run: RunConfig, tok: Tokenizer) -> None:
    """tokenizer.json and config.json (every section) of a fresh run;
    config.json last and atomically: it marks a directory as a run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir / TOKENIZER_FILE)
    _write_atomic(out_dir / CONFIG_FILE, json.dumps(run.to_dict(), indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -- batches ------------------------------------------------------------------------
class TrainBatches:
    """The training batches of each optimizer step: grad_accum micro-batches,
    micro-batch i of step s being the sampler's batch s * grad_accum + i, so a
    batch is a pure function of (seed, step) and a resumed run sees the same
    data."""

    def __init__(self, tokens: np.ndarray, block_size: int, train: TrainConfig, data: DataConfig):
        if data.sampler == "random":
            self.sampler = RandomWindows(tokens, block_size, train.batch_size, train.seed)
        else:
            self.sampler = SlidingWindows(tokens, block_size, train.batch_size, data.stride or block_size,
                                          train.seed)
        self.grad_accum = train.grad_accum

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y int32 and valid bool, each (A, B, T)."""
        pairs = [self.sampler.batch(step * self.grad_accum + i) for i in range(self.grad_accum)]
        x = np.stack([p[0] for p in pairs])  # (A, B, T)
        y = np.stack([p[1] for p in pairs])  # (A, B, T)
        return x, y, np.ones(x.shape, bool)


def val_batches(tokens: np.ndarray, block_size: int, train: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed evaluation batches (x, y int32 (B, T)), the same at every evaluation."""
    return eval_batches(tokens, block_size, train.batch_size, train.eval_batches, train.seed)


def setup_data(out_dir: Path, run: RunConfig, text: str, tok: Tokenizer,
               write_files: bool) -> tuple[TrainBatches, list, int]:
    """Both trainers' data setup: the token files, the training batches, the
    fixed val batches and the number of train tokens; then, when write_files
    (a fresh run, the lead process), tokenizer.json and config.json. A corpus
    too short for one window fails here, before any run file is written."""
    block_size = run.model.context_length
    train_tokens, val_tokens = prepare_data(out_dir, run.data, text, tok)
    batches = TrainBatches(train_tokens, block_size, run.train, run.data)
    evals = val_batches(val_tokens, block_size, run.train)
    if write_files:
        write_run_files(out_dir, run, tok)
    return batches, evals, len(train_tokens)


# -- early stopping -----------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Seed 003's rule: stop after `patience` evaluations in a row that do not
    lower the best val loss by more than `min_delta` (patience 0: never)."""
    patience: int
    min_delta: float
    best: float = math.inf
    best_step: int = -1
    bad_evals: int = 0

    def update(self, val_loss: float, step: int) -> bool:
        """Record an evaluation; True if it is the new best."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


# -- numerical faults ---------------------------------------------------------------
def check_finite(metrics: dict, step: int) -> None:
    """Stop a run whose loss, gradient norm or val loss is NaN or Inf, before
    a checkpoint of its (then useless) params replaces a good one."""
    bad = [f"{k} is {metrics[k]}" for k in ("loss", "grad_norm", "val_loss")
           if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        raise RunError(f"training diverged at step {step}: {', '.join(bad)}; the checkpoints before it are kept "
                       f"(lower train.lr, or check the data, and --resume)")


# -- metrics ------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with a "step"."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None:  # drop what a killed run logged after its last checkpoint
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step and not
                    (r["step"] == resume_step and "val_loss" in r)]
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against the step, to png_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def describe_budget(n_params: int, train: TrainConfig, block_size: int, n_train_tokens: int) -> str:
    """Parameter count and tokens per parameter (Chinchilla: ~20 is compute-optimal)."""
    seen = train.max_steps * train.batch_size * train.grad_accum * block_size
    return (f"{n_params:,} parameters; {n_train_tokens:,} train tokens; {seen:,} tokens seen over {train.max_steps} "
            f"steps = {seen / n_params:.1f} tokens/parameter ({n_train_tokens / n_params:.1f} unique; "
            f"Chinchilla-optimal is ~20)")
