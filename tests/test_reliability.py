"""Crashes, NaNs, dead peers and hostile files never lose work.

- SIGKILL at random moments (most land in a checkpoint save, as a save takes
  most of a step's time here), twice over: --resume ends bit-identical
  to a run that was never interrupted.
- A truncated newest checkpoint is set aside with a warning and the one
  before it used; a stray orbax temporary directory is ignored.
- A NaN stops jaxgpt.train and torchgpt.train with a one-line error naming
  the step; no checkpoint of NaN params is written, the earlier ones stay.
- Two processes (jax.distributed, gloo): killing one makes the other exit
  with an error in seconds instead of hanging.
- No checkpoint loader unpickles objects: a .pt that runs code on load is
  refused by every loader that takes .pt files.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from helpers import REPO, tiny_preset

import jaxgpt.step as jstep
import torchgpt.step as tstep
import torchgpt.train as ttrain
from gptcore import training
from jaxgpt import train
from jaxgpt.checkpoint import load_model

STEPS = 40  # train.max_steps of the preset

TINY_MODEL = dict(context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, embd_dropout=0.1)
TINY_TRAIN = dict(batch_size=4, max_steps=STEPS, lr_decay_steps=STEPS,  # the schedule does not depend on max_steps
                  warmup_steps=2, eval_interval=2, eval_batches=1, log_interval=1, keep_checkpoints=2,
                  sample_tokens=0, cpu_devices=1)  # cpu_devices: runs here and in child processes compute alike


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    return tiny_preset(tmp_path_factory.mktemp("reliability"), 20_000, TINY_MODEL, TINY_TRAIN)


@pytest.fixture(scope="module")
def through(preset, tmp_path_factory) -> Path:
    """The run as it goes when nothing goes wrong, made the way the runs it
    is compared with are made: in a process of its own. (In-process, it took
    the device count of whatever test first started JAX in this worker: a
    2-device run does not sum like a 1-device one, and the comparisons
    failed, now and then, after tests/test_bad_input.py.)"""
    out = tmp_path_factory.mktemp("through") / "run"
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config", str(preset), f"train.out_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def complete_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical exported params and the same loss at every step."""
    for x, y in zip(jax.tree_util.tree_leaves(load_model(a)[1]), jax.tree_util.tree_leaves(load_model(b)[1]),
                    strict=True):
        assert np.array_equal(x, y)
    losses = [[(r["step"], r["loss"]) for r in training.read_metrics(run / "metrics.jsonl") if "loss" in r]
              for run in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
    evals = [[(r["step"], r["val_loss"]) for r in training.read_metrics(run / "metrics.jsonl") if "val_loss" in r]
             for run in (a, b)]
    assert evals[0] == evals[1]  # every evaluation logged once, the one before the kill included


# -- SIGKILL -------------------------------------------------------------------------------
@pytest.mark.parametrize("asynchronous, kills", [(False, 5), (True, 3)], ids=["sync", "async"])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(preset, through, tmp_path, asynchronous, kills):
    """Killed `kills` times mid-run (with train.async_checkpoint, most kills
    land while a background save is writing), each time after the attempt
    saved a checkpoint of its own, then resumed: the run that went through,
    bit for bit, with every val record once and the same checkpoints kept.
    The kill moments are drawn from a seed printed with any failure
    (KILL_SEED=N reruns those moments)."""
    run = tmp_path / "run"
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))
    rng, moments = random.Random(seed), []
    args = [sys.executable, "-m", "jaxgpt.train", "--config", str(preset), f"train.out_dir={run}",
            f"train.async_checkpoint={str(asynchronous).lower()}"]
    for attempt in range(kills):
        before = complete_steps(run)[-1:] or [0]
        proc = subprocess.Popen(args + (["--resume"] if attempt else []), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and complete_steps(run)[-1:] <= before:
            time.sleep(0.005)  # until this attempt has saved a checkpoint of its own
        moments.append(round(rng.uniform(0.0, 0.25), 3))
        time.sleep(moments[-1])
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        drawn = f"KILL_SEED={seed}, kills {moments} s after a new checkpoint"
        assert proc.returncode == -signal.SIGKILL, f"attempt {attempt} was not running ({drawn}): {err[-2000:]}"
        assert complete_steps(run)[-1] < STEPS and not (run / "model").exists(), drawn
    assert train.main(["--config", str(preset), f"train.out_dir={run}", "--resume"]) == 0
    print(drawn)
    assert_same_run(run, through)
    assert complete_steps(run) == complete_steps(through), drawn  # retention applies to every process's saves


def test_truncated_newest_checkpoint_falls_back_with_a_warning(preset, through, tmp_path, capsys):
    """Steps 2 and 4 on disk, step 4's array files cut short, and an orbax
    temporary directory of a save that was killed: --resume warns, moves
    step 4 aside (not deleting it), continues from step 2 and ends as if
    nothing had happened."""
    run = tmp_path / "run"
    assert train.main(["--config", str(preset), f"train.out_dir={run}", "train.max_steps=4"]) == 0
    assert complete_steps(run) == [2, 4]
    for p in (run / "checkpoints" / "4").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    partial = run / "checkpoints" / "6.orbax-checkpoint-tmp"  # the name orbax gives a save in progress
    partial.mkdir()
    (partial / "state").mkdir()
    capsys.readouterr()

    assert train.main(["--config", str(preset), f"train.out_dir={run}", f"train.max_steps={STEPS}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: checkpoint 4 is unreadable .*resuming from step 2", err), err
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("4.corrupt")]
    assert len(aside) == 1 and any(aside[0].rglob("*"))  # kept for the user to inspect
    assert_same_run(run, through)


# -- SIGINT / SIGTERM ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_through(preset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch_through") / "run"
    assert ttrain.main(["--config", str(preset), f"train.out_dir={out}"]) == 0
    return out


@pytest.mark.parametrize("trainer,sig", [("jaxgpt", signal.SIGINT), ("torchgpt", signal.SIGTERM)])
def test_a_signal_checkpoints_the_step_and_resume_ends_as_if_uninterrupted(preset, through, torch_through,
                                                                           tmp_path, trainer, sig):
    """Ctrl-C (or SIGTERM) mid-training: within seconds, one line saying how
    to resume, exit status 128 + signal, a checkpoint of the step in progress
    and no model yet; --resume then ends exactly where a run that was never
    interrupted ends."""
    run = tmp_path / "run"
    args = ["--config", str(preset), f"train.out_dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", f"{trainer}.train", *args, "train.max_steps=4000"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(
            "loss" in r for r in training.read_metrics(run / "metrics.jsonl")):
        time.sleep(0.01)  # until it is stepping
    proc.send_signal(sig)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10 and proc.returncode == 128 + sig, err[-2000:]
    line = err.strip().splitlines()[-1]
    stopped = re.fullmatch(rf"stopped by {sig.name} after step (\d+), checkpoint saved; continue with: "
                           rf"--resume train.out_dir={re.escape(str(run))}", line)
    assert stopped, line
    step = int(stopped[1])
    assert 0 < step < STEPS and not (run / "model").exists()
    main = train.main if trainer == "jaxgpt" else ttrain.main
    if trainer == "jaxgpt":
        assert step in complete_steps(run)
    else:
        assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == step
    assert main([*args, "--resume", f"train.max_steps={STEPS}"]) == 0
    if trainer == "jaxgpt":
        assert_same_run(run, through)
    else:
        ours, theirs = (safetensors.numpy.load_file(r / "model" / "model.safetensors") for r in (run, torch_through))
        assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
        metrics = [[{k: v for k, v in r.items() if k not in ("tok_per_s", "time_s")}  # wall clock: not state
                    for r in training.read_metrics(x / "metrics.jsonl")] for x in (run, torch_through)]
        assert metrics[0] == metrics[1]  # every loss, grad norm, lr and val loss


# -- NaN -----------------------------------------------------------------------------------
def test_nan_stops_jax_training_and_keeps_the_last_good_checkpoint(preset, tmp_path, monkeypatch, capsys):
    """The params turn NaN after step 5 (as in a divergence): step 6's loss
    and gradients are NaN, caught before the checkpoint of step 6."""
    real = jstep.train_step

    def step_then_poison(state, batch, rng):
        state, metrics = real(state, batch, rng)
        if int(state.step) == 5:
            state = state.replace(params=jax.tree_util.tree_map(lambda a: a * np.nan, state.params))
        return state, metrics
    monkeypatch.setattr(jstep, "train_step", step_then_poison)
    run = tmp_path / "run"
    capsys.readouterr()
    code = train.main(["--config", str(preset), f"train.out_dir={run}", "train.log_interval=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: training diverged at step 6: loss is nan"), err[-3:]
    assert complete_steps(run) == [2, 4] and not (run / "model").exists()  # checked before the save at step 6
    monkeypatch.undo()
    assert train.main(["--config", str(preset), f"train.out_dir={run}", "--resume", "train.max_steps=8"]) == 0
    assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(load_model(run)[1]))  # resumed from step 4


def test_nan_stops_torch_training(preset, tmp_path, monkeypatch, capsys):
    """The params turn NaN after step 3; the log boundary of step 4 stops the run."""
    done = []

    def step_then_poison(model, optimizer, batch, step, cfg):
        metrics = real(model, optimizer, batch, step, cfg)
        done.append(step)
        if step + 1 == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return metrics
    real = tstep.train_step
    monkeypatch.setattr(tstep, "train_step", step_then_poison)
    run = tmp_path / "run"
    capsys.readouterr()
    code = ttrain.main(["--config", str(preset), f"train.out_dir={run}", "train.log_interval=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: training diverged at step 4: loss is nan"), err[-3:]
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (run / "model").exists() and len(done) == 4


# -- two processes ---------------------------------------------------------------------------
def test_killing_one_process_stops_the_other(preset, tmp_path):
    """Process 1 of a 2-process run is killed mid-training: process 0 fails
    fast with one error line (gloo sees the closed connection; heartbeats
    bound any case it does not see) and never reaches an export."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               JAXGPT_HEARTBEAT_TIMEOUT="10")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxgpt.train", "--config", str(preset), f"train.out_dir={tmp_path / f'p{i}'}",
         "train.parallel=mesh", "train.max_steps=100000", "train.lr_decay_steps=100000", "train.eval_interval=1000",
         "train.log_interval=5", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 90
        metrics = tmp_path / "p0" / "metrics.jsonl"
        while time.time() < deadline and len(training.read_metrics(metrics)) < 2 and procs[0].poll() is None:
            time.sleep(0.05)  # until process 0 has logged training steps (after the step-0 evaluation)
        assert procs[0].poll() is None and len(training.read_metrics(metrics)) >= 2, procs[0].stderr.read()[-2000:]
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=60)
        took = time.time() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    last = err.strip().splitlines()[-1]
    assert procs[0].returncode != 0 and took < 30, (procs[0].returncode, took, err[-2000:])
    assert last.startswith("error: process 0 of 2:"), err[-2000:]
    assert not (tmp_path / "p0" / "model").exists()


# -- hostile files --------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_no_loader_unpickles_objects(preset, through, tmp_path, capsys):
    """A .pt that runs code when unpickled, as torchgpt.train's latest.pt and
    as a convert source (.pt, nanoGPT, HF pytorch_model.bin): refused with a
    one-line error, the payload never runs. And no product code calls
    torch.load without weights_only=True, or pickle / np.load(allow_pickle)."""
    pwned = tmp_path / "pwned"
    evil = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "step": 2, "rng": torch.zeros(2), "loop": {},
            "x": Payload(pwned)}
    run = tmp_path / "run"  # the finished run, with an evil latest.pt and no best.pt
    shutil.copytree(through, run)
    for p in (run / "checkpoints").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    torch.save(evil, run / "checkpoints" / "latest.pt")
    capsys.readouterr()
    assert ttrain.main(["--config", str(preset), f"train.out_dir={run}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "weights only load failed" in err.lower() and err.count("\n") == 1, err

    from jaxgpt.convert import main as convert_main
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    torch.save(evil, hf / "pytorch_model.bin")
    for src, fmt in ((run / "checkpoints" / "latest.pt", "pt"), (run / "checkpoints" / "latest.pt", "nanogpt"),
                     (hf, "hf")):
        assert convert_main([str(src), str(tmp_path / "out.safetensors"), "--from", fmt]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not pwned.exists() and not (tmp_path / "out.safetensors").exists()

    for path in [*REPO.glob("gptcore/**/*.py"), *REPO.glob("jaxgpt/**/*.py"), *REPO.glob("torchgpt/**/*.py")]:
        code = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", code):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle=True|weights_only=False", code), path


# -- one trainer per run directory ------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["jaxgpt", "torchgpt"])
def test_a_run_directory_in_use_is_refused(preset, tmp_path, capsys, trainer):
    """While another process holds OUT_DIR's lock (as a running trainer
    does), a second trainer gets one line naming the holder and writes
    nothing; once the lock is free the same command runs."""
    main = train.main if trainer == "jaxgpt" else ttrain.main
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["--config", str(preset), f"train.out_dir={run}", "train.max_steps=2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by process {holder.pid}" in err, err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(["--config", str(preset), f"train.out_dir={run}", "train.max_steps=2"]) == 0
