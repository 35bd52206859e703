"""The first run's tools and warnings, end to end on a tiny model: the
vocabulary size taken from the tokenizer (and the warning for unused rows),
an MoE run's routing metrics, TensorBoard / W&B logging of every record, and
the end-of-training sample's start. The CLI runs in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import tiny_preset
from test_train import TINY_MODEL, TINY_TRAIN

from gptcore import training
from gptcore.tokenizer import Tokenizer
from gptcore.train_config import TrainConfig
from jaxgpt import train


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    """A tiny preset on the first 50k characters of tiny Shakespeare."""
    return tiny_preset(tmp_path_factory.mktemp("first_run"), 50_000, TINY_MODEL, TINY_TRAIN)


def test_vocab_size_auto_takes_the_tokenizers_and_unused_rows_warn(preset, tmp_path, capsys):
    """model.vocab_size=auto: the tokenizer's size; a vocabulary padded by
    more than VOCAB_PAD_MARGIN rows: one warning line with the cost; a
    nanoGPT-style pad to a multiple of 64: quiet."""
    from gptcore.run import VOCAB_PAD_MARGIN

    def resolved(*overrides) -> tuple[int, str]:
        assert train.main(["--config", str(preset), *overrides, "--print-config"]) == 0
        out, err = capsys.readouterr()
        return next(int(line.split("=")[1]) for line in out.splitlines() if line.startswith("vocab_size")), err

    n, err = resolved("model.vocab_size=auto")
    assert err == ""
    assert resolved(f"model.vocab_size={n + 64}") == (n + 64, "")
    big = n + VOCAB_PAD_MARGIN + 1000
    got, err = resolved(f"model.vocab_size={big}")
    assert got == big and err.startswith("warning:") and err.count("\n") == 1
    assert f"leaves {big - n:,} of its rows unused" in err and "MiB" in err


@pytest.mark.parametrize("trainer", ["jaxgpt", "torchgpt"])
def test_moe_runs_log_expert_load_and_dropped_share(preset, tmp_path, trainer):
    """Each metrics.jsonl record of a mixture-of-experts run says where the
    step's valid (token, choice) assignments went: a share per expert and
    the dropped share, summing to 1. At capacity_factor 0.5 the experts hold
    half the assignments, so at least half are dropped."""
    from torchgpt import train as ttrain
    main = {"jaxgpt": train.main, "torchgpt": ttrain.main}[trainer]
    out = tmp_path / "moe"
    assert main(["--config", str(preset), f"train.out_dir={out}", "model.n_experts=4", "model.top_k=2",
                 "model.moe_impl=capacity", "model.capacity_factor=0.5", "train.max_steps=10",
                 "train.sample_tokens=0"]) == 0
    records = [r for r in training.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [5, 10]
    for r in records:
        assert len(r["expert_load"]) == 4 and min(r["expert_load"]) >= 0.0
        assert abs(sum(r["expert_load"]) + r["dropped"] - 1.0) <= 1e-5
        assert 0.5 - 1e-6 <= r["dropped"] < 1.0


def test_samples_start_from_a_real_token(tmp_path):
    """The end-of-training sample starts after a newline when the tokenizer
    has one (a BPE's [pad], id 0, was the start before), else from eos or
    id 0, which the text leaves out."""
    from types import SimpleNamespace

    from gptcore.loop import write_sample

    class Engine:
        def sample(self, prompt, n_tokens, temperature, seed):
            self.prompt = prompt
            return tok.encode(" the king")

    text = "the king is dead\nlong live the king\n" * 50
    for tok, start in ((Tokenizer.train_bpe(text, 300), "\n"), (Tokenizer.train_char(text), "\n"),
                       (Tokenizer.train_char(text.replace("\n", " ")), "")):
        engine = Engine()
        got = write_sample(SimpleNamespace(tokenizer=tok, train=TrainConfig(sample_tokens=3)), engine,
                           tmp_path / "sample.txt")
        assert got == (tmp_path / "sample.txt").read_text(encoding="utf-8")
        assert got.startswith(start) and got.strip() == "the king"
        assert engine.prompt == (tok.encode("\n") if start else [tok.eos_id or 0]) and "[pad]" not in got


def read_tensorboard(directory: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in the event files under directory
    (TFRecord framing: length u64, its crc u32, the Event proto, its crc u32)."""
    import struct

    from tensorboardX.proto import event_pb2
    values = {}
    for path in directory.iterdir():
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            values |= {(v.tag, event.step): v.simple_value for v in event.summary.value}
    return values


def test_tensorboard_and_wandb_get_every_record(preset, tmp_path, monkeypatch):
    """train.tensorboard writes every metrics.jsonl value as a TensorBoard
    scalar (an MoE run's expert_load as expert_load/0..E-1); train.wandb_project
    logs the same to W&B, here a stand-in `wandb` module recording the calls."""
    import importlib.machinery
    import types

    from gptcore.loggers import scalars
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or fake
    fake.log = lambda values, step: calls.append(("log", step, values))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "logged"
    assert train.main(["--config", str(preset), f"train.out_dir={out}", "train.tensorboard=true",
                       "train.wandb_project=jaxgpt-test", "train.max_steps=10", "train.sample_tokens=0",
                       "model.n_experts=2", "model.top_k=1"]) == 0
    records = training.read_metrics(out / "metrics.jsonl")
    want = {(name, r["step"]): value for r in records for name, value in scalars(r).items()}
    assert ("expert_load/1", 10) in want and ("val_loss", 0) in want
    got = read_tensorboard(out / "tensorboard")
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in want)  # float32 in the events
    assert calls[0][0] == "init" and calls[0][1]["project"] == "jaxgpt-test" and calls[-1] == ("finish",)
    assert [(c[1], c[2]) for c in calls[1:-1]] == [(r["step"], scalars(r)) for r in records]


def test_a_logger_whose_package_is_missing_is_refused_before_anything_is_written(preset, tmp_path, capsys,
                                                                                monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "r"
    assert train.main(["--config", str(preset), f"train.out_dir={out}", "train.wandb_project=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.wandb_project needs the wandb package") and err.count("\n") == 1
    assert not out.exists()
