"""What both trainers share below the loop, framework-free: the token files
and the batches of each step, early stopping, numerical checks,
metrics.jsonl and the loss plot.

A run directory (train.out_dir) holds

    config.json     every config section of the run ({"model": ..., "train": ..., "data": ...})
    tokenizer.json  the tokenizer the model was trained with
    data/           the corpus as a token dataset (gptcore.prepare; absent with data.tokens)
    checkpoints/    the trainer's checkpoints (latest ones and the best by val loss)
    model/          the exported model directory (best params)
    metrics.jsonl   one JSON record per logged step / evaluation
    loss.png        train and val loss
    sample.txt      a sample from the final model
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.data import RandomWindows, SlidingWindows, eval_batches
from gptcore.errors import write_atomic
from gptcore.lock import LOCK_FILE
from gptcore.prepare import prepare
from gptcore.run import CONFIG_FILE, FINGERPRINT_FILE, Run, RunError, fingerprint
from gptcore.shards import ShardedTokens
from gptcore.tokenizer import FILENAME as TOKENIZER_FILE
from gptcore.train_config import DataConfig, TrainConfig

METRICS_FILE = "metrics.jsonl"


# -- run directory ------------------------------------------------------------------
def prepare_data(run: Run) -> tuple[ShardedTokens, ShardedTokens]:
    """(train tokens, val tokens) of a token dataset: data.tokens, or the
    corpus prepared once into OUT_DIR/data (gptcore.prepare, reused while the
    corpus and the settings stay the same)."""
    data = run.data
    if data.tokens:
        directory = Path(data.tokens).expanduser()
    else:
        directory = run.out_dir / "data"
        prepare(data.corpus, run.tokenizer, directory, text_field=data.text_field, cache_dir=data.cache_dir,
                val_fraction=data.val_fraction, val_split=data.val_split, num_proc=data.num_proc or None)
    return ShardedTokens(directory, "train"), ShardedTokens(directory, "val")


def write_run_files(run: Run) -> None:
    """tokenizer.json, fingerprint.json and config.json (every section) of a
    new run; config.json last and atomically: it marks a directory as a run."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.tokenizer.save(run.out_dir / TOKENIZER_FILE)
    write_atomic(run.out_dir / FINGERPRINT_FILE, json.dumps(fingerprint(run), indent=2) + "\n")
    write_atomic(run.out_dir / CONFIG_FILE, json.dumps(run.to_dict(), indent=2) + "\n")


def has_checkpoint(out_dir: Path) -> bool:
    """The run directory holds a checkpoint either trainer wrote (a step directory or a .pt)."""
    ckpts = out_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() or p.suffix == ".pt" for p in ckpts.iterdir())


def remove_new_run(out_dir: Path, created: bool) -> None:
    """Undo a new run that failed before its first checkpoint: everything in
    out_dir but the lock (it started empty: gptcore.run.check_out_dir), and
    out_dir itself when the run created it."""
    for p in out_dir.iterdir():
        if p.name == LOCK_FILE:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if created:
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
        out_dir.rmdir()


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

    def batch(self, step: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y int32 and valid bool, each (A, B, T); with `rows` (multi-host:
        the rows this process feeds), only those rows are read: (A, len(rows), T)."""
        pairs = [self.sampler.batch(step * self.grad_accum + i, rows) for i in range(self.grad_accum)]
        x = np.stack([p[0] for p in pairs])  # (A, B, T)
        y = np.stack([p[1] for p in pairs])  # (A, B, T)
        return x, y, np.ones(x.shape, bool)


def val_batches(tokens: np.ndarray, block_size: int, train: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed evaluation batches (x, y int32 (B, T)), the same at every evaluation."""
    return eval_batches(tokens, block_size, train.batch_size, train.eval_batches, train.seed)


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
    """metrics.jsonl: one JSON object per line, each with a "step". Only the
    lead process writes (enabled); the others log nothing."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True, also=None):
        self.path, self.enabled, self.also = path, enabled, also  # also: gptcore.loggers.Loggers or None
        if enabled and resume_step is not None:  # drop what a killed run logged after its last checkpoint
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.also is not None:
                self.also.write(record)

    def close(self) -> None:
        if self.also is not None:
            self.also.close()
            self.also = None


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
