"""Which run should `python -m jaxgpt.train` make by default? Val loss
against wall time for a few shapes and schedules on the default (offline
Shakespeare) corpus, on this machine.

    python benchmarks/default_run_study.py            # the README table and curve

Each candidate is `python -m jaxgpt.train --config default` with the
overrides below (every one spelled out, so the table does not move when
configs/default.toml does), run one after another in a subprocess (never
two at once: they would share the cores), sample off, 20 val batches per
evaluation. Its val records carry time_s, the training loop's wall seconds
(compilation and evaluations included; data preparation and export are
not, and are reported apart as the whole command's time). Prints a markdown
table and writes the curves to benchmarks/results/default_run_study.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.eval_batches=20", "train.sample_tokens=0", "train.min_lr=1e-4", "train.weight_decay=0.1",
          "train.grad_clip=1.0", "train.beta1=0.9", "model.n_heads=4", "model.d_ff=512"]


def recipe(block: int, batch: int, steps: int, warmup: int, beta2: float, dropout: float, every: int) -> list[str]:
    """The overrides of one candidate: 4 layers of 128 dims, lr 1e-3."""
    return [f"model.context_length={block}", "model.d_model=128", "model.n_layers=4", f"train.batch_size={batch}",
            f"train.max_steps={steps}", "train.lr=1e-3", f"train.warmup_steps={warmup}", f"train.beta2={beta2}",
            f"train.eval_interval={every}", *(f"model.{k}_dropout={dropout}" for k in ("embd", "attn", "resid"))]


CANDIDATES = {
    "seed001_mini, 600 steps of 32 x 128, dropout 0.1 (the previous default)": recipe(128, 32, 600, 50, 0.95, 0.1,
                                                                                       100),
    "2000 steps of 12 x 64, dropout 0 (nanoGPT's CPU recipe)": recipe(64, 12, 2000, 100, 0.99, 0.0, 250),
    "3000 steps of 12 x 64, dropout 0": recipe(64, 12, 3000, 100, 0.99, 0.0, 250),
    "1500 steps of 16 x 128, dropout 0": recipe(128, 16, 1500, 100, 0.99, 0.0, 250),
}


def run(name: str, overrides: list[str], root: Path) -> dict:
    out = root / str(len(list(root.iterdir())))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config", "default", *COMMON, *overrides,
                           f"train.out_dir={out}"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["time_s"], r["val_loss"]) for r in records if "val_loss" in r and "time_s" in r]
    return {"name": name, "curve": curve, "wall_s": wall, "final": curve[-1][1], "loop_s": curve[-1][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default=str(REPO / "benchmarks" / "results" / "default_run_study.png"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CANDIDATES.items():
            results.append(run(name, overrides, Path(tmp)))
            print(f"done: {name}: val {results[-1]['final']:.4f} in {results[-1]['wall_s']:.0f} s", file=sys.stderr)
    print("| candidate | final val loss | training loop s | whole command s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['final']:.4f} | {r['loop_s']:.0f} | {r['wall_s']:.0f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        ax.plot(*zip(*r["curve"]), marker="o", label=r["name"])
    ax.set_xlabel("wall seconds of the training loop (2-core CPU)")
    ax.set_ylabel("val loss (20 batches)")
    ax.set_ylim(top=2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
