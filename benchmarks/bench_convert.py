"""Peak memory of a conversion: does it stay tensor by tensor?

    python benchmarks/bench_convert.py            # the README table (a ~500 MB GPT-2-small-shaped checkpoint)
    python benchmarks/bench_convert.py --layers 2  # quick look

Writes a jaxgpt model directory of GPT-2 small's shape (float32, random
weights, written one tensor at a time) into a temporary folder, then runs
`python -m jaxgpt.convert` on it once per target in a fresh process and
reads that process's peak RSS over the conversion alone (VmHWM, reset
after the imports) against its RSS before it. The claim to check: the
growth stays under 2x the largest tensor (the token embedding, 50257 x 768
x 4 B = 154 MB) and does not grow with the checkpoint's size (compare
--layers 2 and 12).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptcore.config import ModelConfig  # noqa: E402
from gptcore.formats import safetensors_io  # noqa: E402
from gptcore.formats.state import state_shapes  # noqa: E402
from gptcore.model_dir import write_model_dir  # noqa: E402

TARGETS = {"HF GPT-2 (1 shard)": ("hf", []), "HF GPT-2 (100MB shards)": ("hf", ["--max-shard-size", "100MB"]),
           "safetensors file": ("model.safetensors", []), "jaxgpt directory": ("jaxgpt", []),
           ".pt file": ("model.pt", [])}


def gpt2_small(layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=50257, context_length=1024, d_model=768, n_layers=layers, n_heads=12,
                       position="learned", qkv_bias=True, out_bias=True, mlp="gelu_tanh", mlp_bias=True)


def write_checkpoint(directory: Path, cfg: ModelConfig) -> int:
    """A model directory with random float32 weights, one tensor in memory at a time; its bytes."""
    rng = np.random.default_rng(0)
    shapes = state_shapes(cfg)

    def weights(tmp: Path) -> None:
        tensors = ((name, rng.standard_normal(shape, dtype=np.float32) * 0.02) for name, shape in shapes.items())
        safetensors_io.write(tmp / "model.safetensors", tensors, {"format": "pt"})
    write_model_dir(directory, cfg, None, weights)
    return sum(4 * int(np.prod(s)) for s in shapes.values())


CHILD = """
import sys
import jaxgpt.convert as c
def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the peak from here on
base = kb("VmRSS")
assert c.main(sys.argv[1:]) == 0
print(base * 1024, kb("VmHWM") * 1024)
"""


def peak_rss(args: list[str]) -> tuple[int, int]:
    """(RSS after the imports, peak RSS of the conversion) of `jaxgpt.convert ARGS` in a fresh process, bytes."""
    out = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"convert {args} failed: {out.stderr[-2000:]}")
    base, peak = map(int, out.stdout.split()[-2:])
    return base, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        size = write_checkpoint(tmp / "big", gpt2_small(args.layers))
        largest = 50257 * 768 * 4
        print(f"#### GPT-2 small shape, {args.layers} layers: checkpoint {size / 1e6:,.0f} MB, largest tensor "
              f"{largest / 1e6:,.0f} MB\n")
        print("| target | RSS after imports | peak RSS converting | peak - imports | / largest tensor |")
        print("|---|---|---|---|---|")
        for i, (label, (target, extra)) in enumerate(TARGETS.items()):
            dst = tmp / f"out-{i}" / target
            base, peak = peak_rss([str(tmp / "big"), str(dst), *extra, *(["--to", "hf"] if target == "hf" else [])])
            print(f"| {label} | {base / 1e6:,.0f} MB | {peak / 1e6:,.0f} MB | {(peak - base) / 1e6:,.0f} MB | "
                  f"{(peak - base) / largest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
