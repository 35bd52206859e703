"""Parallel training equals single-device training: pmap over 4 simulated
devices, a (data, fsdp) mesh with fsdp 1, 2 and 4, and two processes on
127.0.0.1 (gloo) against one. Each case runs in a subprocess because the
device count is fixed when jax starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SHAKESPEARE

# Three steps of a tiny model with grad accumulation and clipping, on each
# runner named in argv[1] (comma-separated); params go to argv[2]/KIND.npz (process 0).
SCRIPT = r"""
import sys, jax, numpy as np
kinds, out = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:  # multi-process: coordinator, num_processes, process_id
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig
import jaxgpt.step as js
from jaxgpt import runners
from jaxgpt.model import GPT, init_params
mc = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
tc = TrainConfig(batch_size=8, grad_accum=2, warmup_steps=1, max_steps=3, lr=1e-2, grad_clip=0.5)
make = {"single": lambda: runners.SingleDevice(), "pmap": lambda: runners.PmapRunner(),
           "mesh1": lambda: runners.MeshRunner(1), "mesh2": lambda: runners.MeshRunner(2),
           "mesh4": lambda: runners.MeshRunner(4)}
for kind in kinds.split(","):
    runner = make[kind]()
    state = runner.place_state(js.create_state(GPT(mc), init_params(mc, 0), tc))
    for step in range(3):
        rng = np.random.default_rng(step)
        x, y = (rng.integers(0, 64, (2, 8, 16)).astype(np.int32) for _ in range(2))
        state, m = runner.step(state, runner.place_batch((x, y, np.ones(x.shape, bool))), js.step_key(0, step))
    params = runners.gather(runner.checkpoint_state(state).params)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
        metrics = runner.metrics(m)
        np.savez(f"{out}/{kind}.npz", loss=metrics["loss"], grad_norm=metrics["grad_norm"], **flat)
"""


def run(args: list[str], devices: int) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def load(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_same(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.linalg.norm(a[k] - b[k]) <= rtol * np.linalg.norm(b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ref")
    finish(run(["single", str(path)], 1))
    return load(path / "single.npz")


def test_pmap_and_mesh_equal_single_device(reference, tmp_path):
    """pmap data parallel, mesh data parallel (fsdp 1), and FSDP over 2 and 4
    devices, all on 4 devices, give the single device's params and loss."""
    kinds = ("pmap", "mesh1", "mesh2", "mesh4")
    finish(run([",".join(kinds), str(tmp_path)], 4))
    for kind in kinds:
        got = load(tmp_path / f"{kind}.npz")
        assert_same(got, reference)
        assert got["loss"] == pytest.approx(float(reference["loss"]), rel=1e-5), kind
        # clipping and Adam hide a gradient summed twice from the params: the norm does not
        assert got["grad_norm"] == pytest.approx(float(reference["grad_norm"]), rel=1e-5), kind


def test_fsdp_shards_the_largest_divisible_axis():
    from jax.sharding import PartitionSpec as P

    from jaxgpt.runners import fsdp_spec
    assert fsdp_spec((64, 128), 4) == P(None, "fsdp")
    assert fsdp_spec((128, 64), 4) == P("fsdp", None)
    assert fsdp_spec((6,), 4) == P() and fsdp_spec((), 4) == P() and fsdp_spec((64, 128), 1) == P()


def test_two_processes_equal_one(reference, tmp_path):
    """Two processes with 2 devices each (FSDP over the 4 global devices,
    gloo collectives) give the single process's params."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run(["mesh2", str(tmp_path), f"127.0.0.1:{port}", "2", str(pid)], 2) for pid in range(2)]
    for proc in procs:
        finish(proc)
    assert_same(load(tmp_path / "mesh2.npz"), reference)


def test_cpu_devices_divide_the_batch():
    """train.cpu_devices = 0: one device per core, fewer when the batch needs it."""
    from gptcore.train_config import TrainConfig
    from jaxgpt.runners import cpu_device_count
    assert cpu_device_count(TrainConfig(batch_size=12), cores=2) == 2
    assert cpu_device_count(TrainConfig(batch_size=12), cores=8) == 6
    assert cpu_device_count(TrainConfig(batch_size=7), cores=4) == 1
    assert cpu_device_count(TrainConfig(batch_size=12, cpu_devices=3), cores=2) == 3


def test_cli_default_is_data_parallel_over_cpu_devices(tmp_path):
    """python -m jaxgpt.train splits the CPU into train.cpu_devices devices and
    (parallel = "auto") trains data parallel over them: the same losses as
    one device, to float32 reassociation (without dropout: each device draws
    its own masks, as in pmap and DDP)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = [sys.executable, "-m", "jaxgpt.train", "--config", "debug", f"data.corpus={corpus}",
              "train.max_steps=20", "train.log_interval=1", "train.sample_tokens=0", "train.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"d{n}"
        proc = subprocess.run(common + [f"train.cpu_devices={n}", f"train.out_dir={out}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("devices: 1 CPU device" if n == 1 else "devices: 2 CPU devices, mesh data 2") in proc.stdout
        runs[n] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm"):
        got = {n: [r[key] for r in rs if key in r] for n, rs in runs.items()}
        assert len(got[1]) == 20 and np.allclose(got[2], got[1], rtol=1e-5, atol=0), key


def test_cpu_devices_that_do_not_divide_the_batch_are_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config", "debug", "train.cpu_devices=3",
                           "train.batch_size=8", "model.vocab_size=128", f"train.out_dir={tmp_path / 'r'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.batch_size 8 is not divisible by the 3 devices "
                                                    "(on a CPU host: set train.cpu_devices to a divisor of it)")
