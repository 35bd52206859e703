"""jaxgpt.train end to end on a tiny model: overfitting one batch, the CLI's
outputs, kill -9 and --resume (bit-identical), early stopping, fine-tuning
and one-line errors. The CLI runs in-process (main(argv)) so the compiled
step is shared; only the run that gets killed is a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, tiny_preset

import jaxgpt.step as js
from gptcore import training
from gptcore.config import ModelConfig
from gptcore.run import resolve
from gptcore.tokenizer import Tokenizer
from gptcore.train_config import TrainConfig
from jaxgpt import train
from jaxgpt.checkpoint import load_model
from jaxgpt.model import GPT, init_params

TINY_MODEL = dict(context_length=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)
TINY_TRAIN = dict(batch_size=8, max_steps=20, warmup_steps=5, eval_interval=10, eval_batches=2, log_interval=5,
                  sample_tokens=16)


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    """A tiny preset on the first 50k characters of tiny Shakespeare."""
    return tiny_preset(tmp_path_factory.mktemp("train"), 50_000, TINY_MODEL, TINY_TRAIN)


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in training.read_metrics(run_dir / "metrics.jsonl")
            if "loss" in r]


def test_overfit_one_batch():
    """Seed 001's sanity check: a model that cannot drive one batch's loss to
    ~0 has a bug (mask, loss shift, optimizer)."""
    cfg = ModelConfig(vocab_size=16, context_length=16, d_model=64, n_layers=2, n_heads=4)
    tc = TrainConfig(lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, max_steps=200)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 16, (1, 4, 17)).astype(np.int32)
    batch = (jnp.asarray(seq[..., :-1]), jnp.asarray(seq[..., 1:]), jnp.ones((1, 4, 16), bool))
    state = js.create_state(GPT(cfg), init_params(cfg, 0), tc)
    first = None
    for step in range(tc.max_steps):
        state, m = js.train_step(state, batch, js.step_key(0, step))
        first = float(m["loss"]) if first is None else first
    assert first > 2.0 and float(m["loss"]) < 0.1


@pytest.fixture(scope="module")
def smoke_run(preset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert train.main(["--config", str(preset), f"train.out_dir={out}"]) == 0
    return out


def test_cli_run_writes_every_output(smoke_run):
    out = smoke_run
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt", "data/manifest.json",
                 "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"model", "train", "data"}
    tok = Tokenizer.load(out / "tokenizer.json")
    assert config["model"]["vocab_size"] == tok.vocab_size  # taken from the tokenizer
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20] and (out / "checkpoints" / "portable.safetensors").is_file()
    records = training.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20]
    assert [s for s, *_ in losses(out)] == [5, 10, 15, 20]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "sample.txt").read_text()) > 16
    cfg, params, tok_path = load_model(out)  # a run directory loads as its model/
    assert cfg.vocab_size == tok.vocab_size and tok_path == out / "model" / "tokenizer.json"


def test_fresh_run_refuses_an_existing_run(smoke_run, preset, capsys):
    before = (smoke_run / "metrics.jsonl").read_bytes()
    assert train.main(["--config", str(preset), f"train.out_dir={smoke_run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--resume" in err and "\n" not in err
    assert (smoke_run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("argv, needle", [
    (["--config", "no_such_preset"], "no config file"),
    (["train.lr=abc"], "lr"),
    (["train.nope=1"], "unknown key train.nope"),
    (["model.vocab_size=10", "data.corpus=/no/such/file.txt"], "does not exist"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_a_one_line_error(argv, needle, tmp_path, capsys):
    try:
        code = train.main(argv + [f"train.out_dir={tmp_path / 'run'}"])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_vocab_size_smaller_than_the_tokenizer_is_an_error(preset, tmp_path, capsys):
    assert train.main(["--config", str(preset), "model.vocab_size=10", f"train.out_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size = 10 is smaller than the tokenizer's" in err and "model.vocab_size=auto" in err



def test_resume_without_a_checkpoint_is_an_error(preset, tmp_path, capsys):
    assert train.main(["--config", str(preset), "--resume", f"train.out_dir={tmp_path / 'r'}"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_run_without_checkpoints_names_the_way_out(smoke_run, preset, tmp_path, capsys):
    """A run killed before its first checkpoint: neither a fresh run nor
    --resume can use its directory, and each refusal says what will work
    (a new directory that does not exist yet, or deleting this one)."""
    run = tmp_path / "out"
    run.mkdir()
    (run / "config.json").write_bytes((smoke_run / "config.json").read_bytes())
    (tmp_path / "out-2").mkdir()  # taken: the suggestion skips it
    for extra, needle in (([], "saved no checkpoint"), (["--resume"], "stopped before its first one")):
        assert train.main(["--config", str(preset), f"train.out_dir={run}", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and f"train.out_dir={tmp_path / 'out-3'}" in err and f"delete {run}" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_kill_and_resume_is_bit_identical(preset, tmp_path):
    """A run killed with SIGKILL after a checkpoint and resumed ends with the
    same parameters, bit for bit, as one that ran through, and logs the
    same losses at every step."""
    args = ["--config", str(preset), "train.max_steps=300", "train.eval_interval=20", "train.log_interval=1",
            "train.sample_tokens=0", "model.embd_dropout=0.1", "train.grad_accum=2"]

    def cli(*extra):  # a fresh process each, so every run splits the CPU the same way (train.cpu_devices)
        return subprocess.run([sys.executable, "-m", "jaxgpt.train", *args, *extra], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    assert cli(f"train.out_dir={tmp_path / 'through'}").returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.train", *args, f"train.out_dir={killed}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpts = killed / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was still running
    at_kill = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert 0 < at_kill < 300 and not (killed / "model").exists()

    resumed = cli("--resume", f"train.out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, through, _ = load_model(tmp_path / "through")
    _, resumed, _ = load_model(killed)
    for a, b in zip(jax.tree_util.tree_leaves(through), jax.tree_util.tree_leaves(resumed)):
        assert np.array_equal(a, b)
    assert losses(killed) == losses(tmp_path / "through") and len(losses(killed)) == 300


def test_early_stopping(preset, tmp_path):
    """patience 1 and an improvement threshold no eval can meet: the second
    evaluation stops the run."""
    spec = resolve(str(preset), ["train.patience=1", "train.min_delta=100.0", "train.max_steps=50",
                                 f"train.out_dir={tmp_path / 'r'}", "train.sample_tokens=0"])
    summary = train.run(spec)
    assert summary["stopped_early"] and summary["steps"] == 20 and summary["best_step"] == 10
    assert max(r["step"] for r in training.read_metrics(tmp_path / "r" / "metrics.jsonl")) == 20


@pytest.mark.parametrize("trainer", ["jaxgpt", "torchgpt"])
def test_finetune_from_a_run(smoke_run, preset, tmp_path, trainer, capsys):
    """init_from loads the params (not the optimizer) of a jax-trained run and
    trains with its own lr: the first evaluation equals the source model's
    best val loss (torch: float32 rounding apart), the architecture and
    tokenizer are the source's, and the run says where it started from."""
    from torchgpt import train as ttrain
    main, rel = (train.main, 1e-6) if trainer == "jaxgpt" else (ttrain.main, 1e-5)
    out = tmp_path / "ft"
    assert main(["--config", str(preset), f"train.init_from={smoke_run}", "train.lr=1e-4",
                 "train.min_lr=1e-5", "train.max_steps=10", f"train.out_dir={out}"]) == 0
    assert f"fine-tuning {smoke_run / 'model'} " in capsys.readouterr().out
    source = training.read_metrics(smoke_run / "metrics.jsonl")
    first = training.read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 0
    assert first["val_loss"] == pytest.approx(min(r["val_loss"] for r in source if "val_loss" in r), rel=rel)
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-4
    assert (out / "tokenizer.json").read_bytes() == (smoke_run / "tokenizer.json").read_bytes()
    assert load_model(out)[0] == load_model(smoke_run)[0]


def test_print_config_round_trips_and_writes_nothing(preset, tmp_path, capsys):
    """--print-config prints every section with its defaults; that TOML as
    --config is the same run; nothing is written."""
    out = tmp_path / "r"
    overrides = ["train.lr=3e-4", "model.n_layers=1", f"train.out_dir={out}", "train.seed=7"]
    capsys.readouterr()
    assert train.main(["--config", str(preset), *overrides, "--print-config"]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert not out.exists()
    spec = resolve(str(preset), overrides)
    assert resolve(str(printed), []).to_dict() == spec.to_dict()
    text = printed.read_text()
    assert "lr = 0.0003" in text and "mlp_dropout = 0.0" in text  # overrides and defaults alike


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    from gptcore.presets import preset_names
    assert all(f"  {name} " in text for name in preset_names()) and "--print-config" in text


@pytest.mark.parametrize("first,second", [("jaxgpt", "torchgpt"), ("torchgpt", "jaxgpt")])
def test_the_other_twin_resumes_a_run(preset, tmp_path, first, second):
    """10 steps in one trainer, resumed by the other for 10 more, match 20
    steps of the first: every logged loss, grad norm and lr, and the final
    params and both Adam moments (relative 1e-4; no dropout, fp32). The
    portable train state carries params, moments, step, schedule and loop
    state; the batches follow from (seed, step)."""
    from gptcore import train_state
    from torchgpt import train as ttrain
    mains = {"jaxgpt": train.main, "torchgpt": ttrain.main}
    common = ["--config", str(preset), "train.lr_decay_steps=20", "train.sample_tokens=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert mains[first]([*common, f"train.out_dir={whole}"]) == 0
    assert mains[first]([*common, f"train.out_dir={split}", "train.max_steps=10"]) == 0
    assert mains[second]([*common, f"train.out_dir={split}", "--resume", "train.max_steps=20"]) == 0
    a, b = np.array(losses(whole)), np.array(losses(split))  # (step, loss, grad_norm, lr) rows
    assert a.shape == b.shape == (4, 4) and np.array_equal(a[:, 0], b[:, 0])
    np.testing.assert_allclose(b[:, 1:], a[:, 1:], rtol=1e-4)
    ends = [train_state.read(run / "checkpoints") for run in (whole, split)]
    assert ends[0][0] == ends[1][0] == 20
    for part in (1, 2, 3):  # params, adam_m, adam_v
        ours, theirs = ends[1][part], ends[0][part]
        assert set(ours) == set(theirs)
        err = sum(float(np.sum((ours[k] - theirs[k]) ** 2)) for k in theirs) ** 0.5
        assert err <= 1e-4 * sum(float(np.sum(theirs[k] ** 2)) for k in theirs) ** 0.5




def test_model_files_take_the_users_umask(smoke_run):
    """safetensors writes its files 0600; the model directory's files get
    the modes the user's umask gives (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (smoke_run / "model" / "model.safetensors", smoke_run / "model" / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path





def test_eval_cli_equal_between_twins_and_to_a_direct_forward(smoke_run, preset, capsys):
    """python -m {jaxgpt,torchgpt}.eval on a run's val split: the same loss,
    perplexity and bits per byte from both twins; with --max-tokens one
    window longer than the context, the loss of a direct forward pass."""
    from jaxgpt import eval as jeval
    from jaxgpt.ops import cross_entropy
    from torchgpt import eval as teval
    corpus = preset.parent / "corpus.txt"

    def run(main, *extra) -> dict:
        assert main(["--checkpoint", str(smoke_run), f"data.corpus={corpus}", *extra]) == 0
        out = capsys.readouterr().out.split()
        return {"loss": float(out[1]), "perplexity": float(out[3]), "bits_per_byte": float(out[5]),
                "tokens": int(out[6].strip("(").replace(",", ""))}

    j, t = run(jeval.main, "--split", "val"), run(teval.main, "--split", "val")
    assert j["tokens"] == t["tokens"] == 5_000 - 1  # 10% of the 50k characters, one token each
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert j[key] == pytest.approx(t[key], rel=1e-4)
    assert j["perplexity"] == pytest.approx(np.exp(j["loss"]), rel=1e-3)
    assert j["bits_per_byte"] == pytest.approx(j["loss"] / np.log(2), rel=1e-3)  # ASCII: a byte per token

    cfg, params, tok_path = load_model(smoke_run)
    T = cfg.context_length
    tokens = np.array(Tokenizer.load(tok_path).encode(corpus.read_text(encoding="utf-8")[:T + 1]))
    logits = GPT(cfg).apply({"params": params}, jnp.asarray(tokens[None, :T])).logits
    direct = float(cross_entropy(logits, jnp.asarray(tokens[None, 1:])))
    assert run(jeval.main, "--split", "train", "--max-tokens", str(T + 1))["loss"] == pytest.approx(direct, abs=1e-4)


def test_eval_cli_bad_input_is_one_line(smoke_run, tmp_path, capsys):
    from jaxgpt import eval as jeval
    for argv, needle in ((["--checkpoint", str(tmp_path)], "no"), (["--checkpoint", str(smoke_run), "train.lr=1"],
                                                                    "data.* keys only"),
                         (["--checkpoint", str(smoke_run), "--batch-size", "0"], "--batch-size must be >= 1")):
        assert jeval.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and err.count("\n") == 1, err
