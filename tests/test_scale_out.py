"""Scale-out that holds at real sizes: the train state is created and
restored sharded (no process ever holds it whole), a run resumes on a
different mesh, and jaxgpt.plan compiles a train step for a mesh from
abstract shapes. Multi-device cases run in subprocesses: the device count
is fixed when jax starts."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, SHAKESPEARE

# Four processes with one CPU device each, FSDP over the 4: the peak RSS
# growth of a sharded init, of a checkpoint restore into the shardings, and
# (the control that shows the measure can fail) of building the state on the
# host and placing it, as every process did before. argv: coordinator,
# process id, dir.
MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 4, int(sys.argv[2]))
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig
import jaxgpt.step as js
from jaxgpt import runners
from jaxgpt.model import init_params
from jaxgpt.train_checkpoints import Checkpoints

def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

def growth(make):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = kb("VmRSS")
    made = jax.block_until_ready(make())
    return made, (kb("VmHWM") - base) * 1024

# 31.5M params in 10 layers: 379 MB of params and AdamW moments
mc = ModelConfig(vocab_size=64, context_length=16, d_model=512, n_layers=10, n_heads=4, d_ff=2048)
tc = TrainConfig(batch_size=4, fsdp=4)
model = js.make_model(mc, tc)
runner = runners.MeshRunner(mc, fsdp=4)
small = mc.replace(vocab_size=64)  # warm-up: the process's first compiles grow RSS by themselves
jax.block_until_ready(runner.init_state(lambda: js.fresh_state(js.make_model(small, tc), small, tc)))
state, init = growth(lambda: runner.init_state(lambda: js.fresh_state(model, mc, tc)))
ckpt = Checkpoints(Path(sys.argv[3]) / "checkpoints", keep=1)
ckpt.save(state, {}, 1.0)
restored, restore = growth(lambda: ckpt.restore(state)[0])
same = all(np.array_equal(a.addressable_shards[0].data, b.addressable_shards[0].data)  # this process's shards
           for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)))
del state, restored
_, host = growth(lambda: runner.place_state(js.create_state(model, init_params(mc, tc.seed), tc)))
total = sum(np.dtype(s.dtype).itemsize * int(np.prod(s.shape)) for s in
            jax.tree_util.tree_leaves(jax.eval_shape(lambda: js.fresh_state(model, mc, tc))))
ckpt.close()
print(json.dumps({"init": init, "restore": restore, "host": host, "total": total, "same": same}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_state_is_never_whole_on_a_process(tmp_path):
    """Each of 4 processes grows by its quarter of the state (95 MB) and the
    init's own temporaries (XLA's, about 40 MB for this model) at init, and
    by its quarter and orbax's buffers at restore: well under the whole
    state. Building on the host (the control) grows by most of the whole."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", MEMORY_SCRIPT, f"127.0.0.1:{port}", str(pid), str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(4)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["same"]
        assert r["total"] > 375e6
        assert r["init"] < 0.5 * r["total"], r
        assert r["restore"] < 0.5 * r["total"], r
        assert r["host"] > 0.75 * r["total"], r  # its params whole (and the moments' zero pages unread)


def train(args: list[str], out, devices: int) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config", "debug", f"train.out_dir={out}",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_on_a_different_mesh(tmp_path):
    """A run checkpointed on 8 devices as data 2 x fsdp 2 x tensor 2 resumes
    on 4 devices as fsdp 4 and continues the uninterrupted run (losses,
    grad norms and exported params to float32 reassociation)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = [f"data.corpus={corpus}", "train.log_interval=1", "train.sample_tokens=0", "train.batch_size=8",
              "train.eval_interval=4", "train.eval_batches=2", "train.lr_decay_steps=8", "train.warmup_steps=2",
              "train.portable_state=false"]
    eight = ["train.cpu_devices=8", "train.fsdp=2", "train.tensor=2"]
    whole = train(common + eight + ["train.max_steps=8"], tmp_path / "whole", 8)
    train(common + eight + ["train.max_steps=4"], tmp_path / "cut", 8)
    resumed = train(common + ["--resume", "train.max_steps=8", "train.cpu_devices=4", "train.fsdp=4",
                              "train.tensor=1"], tmp_path / "cut", 4)
    for key in ("loss", "grad_norm", "val_loss"):
        want = {r["step"]: r[key] for r in whole if key in r and r["step"] > 4}
        got = {r["step"]: r[key] for r in resumed if key in r and r["step"] > 4}
        assert want and got.keys() == want.keys(), key
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5, err_msg=key)
    from safetensors.numpy import load_file
    want, got = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "cut"))
    assert want.keys() == got.keys()
    for k in want:
        assert np.linalg.norm(got[k] - want[k]) <= 1e-4 * np.linalg.norm(want[k]), k


def test_two_process_run_trains_checkpoints_and_exports(tmp_path):
    """python -m jaxgpt.train as 2 processes x 2 devices (fsdp 2 x tensor 2,
    asynchronous checkpoints, one shared run directory) trains, checkpoints
    and exports what one process on 4 devices does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = [f"data.corpus={corpus}", "train.log_interval=1", "train.sample_tokens=0", "train.batch_size=8",
              "train.eval_interval=3", "train.eval_batches=2", "train.max_steps=6", "train.fsdp=2",
              "train.tensor=2", "train.async_checkpoint=true"]
    one = train(common + ["train.cpu_devices=4"], tmp_path / "one", 4)
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "jaxgpt.train", "--config", "debug",
                               f"train.out_dir={tmp_path / 'two'}", *common, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(pid)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "grad_norm", "val_loss"):
        want, got = ([r[key] for r in run if key in r] for run in (one, two))
        assert len(want) >= 3 and np.allclose(got, want, rtol=1e-5, atol=0), key
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    from safetensors.numpy import load_file
    want, got = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two"))
    assert want.keys() == got.keys()
    for k in want:
        assert np.linalg.norm(got[k] - want[k]) <= 1e-5 * np.linalg.norm(want[k]), k


# Two processes x 2 CPU devices: each reads only the rows of the global batch
# its devices hold (a recording token stream says which positions it read),
# and the placed global array is the batch one process would build. argv:
# coordinator, process id, fsdp, out file.
ROWS_SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from gptcore.config import ModelConfig
from gptcore.train_config import DataConfig, TrainConfig
from gptcore.training import TrainBatches
from jaxgpt.runners import make_runner

class Recorder:  # a token stream that notes every position read
    lazy_tokens, ndim, dtype = True, 1, np.dtype(np.uint16)
    def __init__(self, tokens):
        self.tokens, self.read = tokens, set()
    def __len__(self):
        return len(self.tokens)
    def __getitem__(self, index):
        self.read.update(np.asarray(index).ravel().tolist())
        return self.tokens[index]

tc = TrainConfig(batch_size=8, grad_accum=2, fsdp=int(sys.argv[3]), parallel="mesh")
runner = make_runner(tc, ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2))
tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
recorder = Recorder(tokens)
mine, whole = TrainBatches(recorder, 16, tc, DataConfig()), TrainBatches(tokens, 16, tc, DataConfig())
rows = runner.local_rows(tc.batch_size)
out = {"rows": rows.tolist(), "steps": []}
for step in range(3):
    recorder.read.clear()
    batch = mine.batch(step, rows)
    placed = runner.place_batch(batch)
    glob = [multihost_utils.process_allgather(a, tiled=True) for a in placed]
    expected = whole.batch(step)
    out["steps"].append({"read": sorted(recorder.read), "local_shape": list(batch[0].shape),
                         "global_equal": all(np.array_equal(g, e) for g, e in zip(glob, expected))})
json.dump(out, open(sys.argv[4], "w"))
"""


@pytest.mark.parametrize("fsdp", [1, 4])
def test_each_process_reads_only_its_rows(fsdp, tmp_path):
    """Data parallel and FSDP over 2 processes x 2 devices: the processes read
    disjoint rows whose union is the global batch (token positions of their
    own windows only), and the global array they place is the 1-process batch."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", ROWS_SCRIPT, f"127.0.0.1:{port}", str(pid), str(fsdp),
                               str(tmp_path / f"p{pid}.json")], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    got = [json.loads((tmp_path / f"p{pid}.json").read_text()) for pid in range(2)]
    rows = [set(g["rows"]) for g in got]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(8)) and len(rows[0]) == 4
    for step in range(3):
        reads = [set(g["steps"][step]["read"]) for g in got]
        assert all(g["steps"][step]["global_equal"] for g in got)
        assert all(g["steps"][step]["local_shape"] == [2, 4, 16] for g in got)  # (A, its rows, T)
        # its A x 4 windows of T + 1 positions at most (the whole batch's 2 x 8 would be ~270)
        assert all(0 < len(r) <= 2 * 4 * 17 for r in reads) and reads[0] != reads[1]


# -- jaxgpt.plan -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plans():
    """jaxgpt.plan's numbers for the debug model on 8 simulated devices, in one subprocess."""
    script = r"""
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
from gptcore.presets import load_config
from jaxgpt.plan import make_plan
out = {}
for name, extra in {"scan": [], "unrolled": ["train.scan_layers=false"], "accum2": ["train.grad_accum=2"],
                    "fsdp8": ["train.fsdp=8", "train.tensor=1"], "single": ["train.fsdp=1", "train.tensor=1"],
                    **{f"{loss}{mesh}": ["model.n_layers=1", "model.vocab_size=8192", f"train.loss_chunk={n}", *axes]
                       for loss, n in (("chunked", 16), ("plain", 0))
                       for mesh, axes in (("", []), ("8", ["train.fsdp=8", "train.tensor=1"]))}}.items():
    c = load_config("debug", ["model.n_layers=4", "train.batch_size=8", "train.fsdp=2", "train.tensor=2",
                              "train.scan_layers=true", *extra])
    devices = jax.devices()[:1] if name == "single" else jax.devices()
    p = make_plan(c["model"], c["train"], devices)
    out[name] = {**p.__dict__, "analytic": p.analytic_state_bytes}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plan_counts_loops_and_shards(plans):
    """Scanned layers and micro-batches count once per iteration (XLA's own
    cost analysis counts a loop body once), the 8 devices' matmul FLOPs add
    up to one device's, and FSDP over 8 holds an eighth of the matrices."""
    scan, unrolled, accum2, fsdp8, single = (plans[k] for k in ("scan", "unrolled", "accum2", "fsdp8", "single"))
    assert scan["flops"] == pytest.approx(unrolled["flops"], rel=0.01)
    assert accum2["flops"] == pytest.approx(2 * scan["flops"], rel=0.01)
    assert 8 * fsdp8["flops"] == pytest.approx(single["flops"], rel=0.05)
    assert scan["collective_bytes"] > 0
    assert accum2["collective_bytes"] > 1.5 * scan["collective_bytes"]  # gathers inside the micro-batch loop
    whole = single["param_bytes"] + single["optimizer_bytes"]
    assert whole == pytest.approx(12 * single["params"], rel=0.01)
    assert (fsdp8["param_bytes"] + fsdp8["optimizer_bytes"]) < 0.2 * whole  # norm gains stay whole
    assert single["temp_bytes"] > 0 and single["mesh"] == "data 1" and fsdp8["mesh"] == "data 1 x fsdp 8"


def test_the_chunked_loss_on_a_mesh_moves_the_head_once(plans):
    """One layer, 8 x 32 tokens, a vocabulary of 8192 in slices of 16: each device
    loops over its own tokens with the whole head, whose gradient is reduced
    once. Left to XLA's partitioner, every slice's matmul was split over the
    sharded features and its logits all-reduced: on fsdp 8, 3.9x the plain
    loss's collectives (now equal); on fsdp 2 x tensor 2, 2.1x (now 1.3x:
    the head is gathered over tensor too) and twice the step's FLOPs."""
    for mesh in ("8", ""):
        chunked, plain = plans[f"chunked{mesh}"], plans[f"plain{mesh}"]
        assert chunked["flops"] == pytest.approx(plain["flops"], rel=0.01), mesh
        bound = 1.01 if mesh == "8" else 1.5
        assert chunked["collective_bytes"] <= bound * plain["collective_bytes"], (mesh, chunked, plain)


def test_plan_counts_collectives_as_the_partitioner_emits_them(tmp_path):
    """XLA:CPU widens bf16 collectives to f32; the plan counts what the SPMD
    partitioner emitted (what an accelerator moves): for a bf16 and an fp32
    step on fsdp 8 (one loop iteration: unrolled layers, one micro-batch),
    the plan's bytes equal the sum over the collectives XLA dumps right
    after partitioning, and the bf16 step's weight gathers are half."""
    script = r"""
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
from gptcore.presets import load_config
from jaxgpt.plan import make_plan
out = []
for dtype in ("bfloat16", "float32"):
    c = load_config("debug", [f"train.dtype={dtype}", "train.fsdp=8", "train.tensor=1", "train.batch_size=8",
                              "train.scan_layers=false", "model.d_model=64", "model.d_ff=256"])
    out.append(make_plan(c["model"], c["train"], jax.devices()).collective_bytes)
print(json.dumps(out))
"""
    dump = tmp_path / "hlo"
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=.* "
                                      "--xla_dump_hlo_pipeline_re=spmd-cleanup --xla_dump_hlo_module_re=sharded_step"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = json.loads(proc.stdout.strip().splitlines()[-1])
    size = {"pred": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
    collective = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(")
    partitioned = []
    for module in sorted(dump.glob("module_*.jit_sharded_step.*.spmd-cleanup.after_cse.*.txt")):
        partitioned.append(sum(size[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                               for line in module.read_text().splitlines() if (m := collective.search(line))
                               for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))))
    assert planned == partitioned, (planned, partitioned)
    assert 0.4 < planned[0] / planned[1] < 0.6  # the matrices' gathers and gradients move as bf16


def test_plan_command_line(tmp_path):
    """The command prints its table; bad input is one line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    ok = subprocess.run([sys.executable, "-m", "jaxgpt.plan", "--config", "debug", "--devices", "4",
                         "train.fsdp=2", "train.tensor=2", "train.batch_size=4"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "data 1 x fsdp 2 x tensor 2 (4 devices)" in ok.stdout and "per device: temporaries" in ok.stdout
    assert "per device: evaluation temporaries" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxgpt.plan", "--config", "debug", "--devices", "6",
                          "train.tensor=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: train.fsdp x train.tensor = 1 x 4 does not divide the 6 devices")


def test_plan_of_a_7b_model_on_64_devices():
    """Llama-2-7B's shape compiles for 64 simulated devices on this machine,
    as fsdp 64 and as fsdp 16 x tensor 4; params + AdamW moments per device
    within 10% of (4 + 8) x params / 64, and the FLOPs of one step within
    the usual bounds: at least 6 x params x tokens (forward and backward) and
    at most 8 x (remat: the forward twice) plus attention. Mixtral-8x7B's
    shape with capacity dispatch on fsdp 8 x expert 8 fits the same 10%.
    The evaluation (forward only, laid out as the step) needs fewer
    temporaries than the step."""
    script = r"""
import json, jax
jax.config.update("jax_num_cpu_devices", 64)
from gptcore.presets import load_config
from jaxgpt.plan import make_plan
out = []
for name, mesh in (("llama2_7b", ["train.fsdp=64"]), ("llama2_7b", ["train.fsdp=16", "train.tensor=4"]),
                   ("mixtral_8x7b", ["train.fsdp=8", "train.expert=8", "model.moe_impl=capacity"])):
    c = load_config(name, mesh)
    out.append({**make_plan(c["model"], c["train"], jax.devices()).__dict__})
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *llamas, mixtral = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mixtral["mesh"] == "data 1 x fsdp 8 x expert 8" and 46.6e9 < mixtral["params"] < 46.8e9
    analytic = 12 * mixtral["params"] / 64
    assert abs(mixtral["param_bytes"] + mixtral["optimizer_bytes"] - analytic) <= 0.1 * analytic, mixtral
    for plan in llamas:
        assert 6.7e9 < plan["params"] < 6.8e9
        analytic = 12 * plan["params"] / 64
        assert abs(plan["param_bytes"] + plan["optimizer_bytes"] - analytic) <= 0.1 * analytic, plan
        assert plan["temp_bytes"] > 0 and plan["collective_bytes"] > 0
        assert 0 < plan["eval_temp_bytes"] < plan["temp_bytes"], plan  # evaluation fits where the step does
        tokens = 64 * 4096 / 64  # per device
        assert 6 * plan["params"] * tokens < plan["flops"] < 8 * plan["params"] * tokens * 1.5, plan


def test_mesh_evaluation_is_laid_out_as_the_step():
    """MeshRunner's evaluation compiled for GPT-2's shape (one layer, 8 x 256
    tokens) on fsdp 8 from abstract shapes: its temporaries are under half of
    a plain jit of the same loss over the same shardings (which held every
    row's activations and the (B, T, V) logits on each device; measured
    785 MiB against 172 MiB). Its values: tests/test_parallel.py, every mesh
    against one device."""
    script = r"""
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp
from gptcore.presets import load_config
from jaxgpt import step
from jaxgpt.runners import MeshRunner
c = load_config("gpt2", ["train.fsdp=8", "train.batch_size=8", "model.n_layers=1", "model.context_length=256",
                         "train.kernels=reference"])
mc, tc = c["model"], c["train"]
runner = MeshRunner(mc, tc.fsdp, tc.tensor, jax.devices())
shapes = jax.eval_shape(lambda: step.fresh_state(step.make_model(mc, tc), mc, tc))
params = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes.params,
                                runner.state_sharding(shapes).params)
x = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=runner.row_sharding)
laid_out = runner.compile_eval(shapes).lower(params, x, x).compile()
plain = jax.jit(lambda p, a, b: step.eval_fn(p, shapes.model, a, b, 0)).lower(params, x, x).compile()
print(json.dumps([c.memory_analysis().temp_size_in_bytes for c in (laid_out, plain)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    laid_out, plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < laid_out < 0.5 * plain, (laid_out, plain)
