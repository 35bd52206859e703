"""The generation CLIs (`python -m jaxgpt.generate`, `python -m torchgpt.generate`)
on a tiny char-level model directory."""

from __future__ import annotations

import io
import subprocess
import sys

import jax
import pytest

import jaxgpt.checkpoint as jckpt
import jaxgpt.generate as jg
import jaxgpt.model as jm
import torchgpt.generate as tg
from gptcore.config import ModelConfig
from gptcore.tokenizer import Tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A char tokenizer + a 2-layer model with a 24-token context, saved by jaxgpt."""
    tmp = tmp_path_factory.mktemp("gen")
    tokenizer_file = Tokenizer.train_char(TEXT).save(tmp / "tok")
    cfg = ModelConfig(vocab_size=Tokenizer.load(tokenizer_file).vocab_size, context_length=24, d_model=32,
                      n_layers=2, n_heads=4, d_ff=64, init_std=0.3)
    return jckpt.save_model(tmp / "model", jm.init_params(cfg, seed=3), cfg, tokenizer_file)


class Recorder(io.StringIO):
    """stdout stand-in that counts the writes: streaming = many writes."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def run(main, argv, monkeypatch, capsys, stdin=""):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(argv)
    return status, out, capsys.readouterr().err


GREEDY = ["--temperature", "0", "--max-new-tokens", "40"]


def test_cli_streams_greedy_text_identically(model_dir, monkeypatch, capsys):
    """Both CLIs read the same directory (orbax params / model.safetensors) and
    print the prompt, then the continuation in pieces; greedy text is equal."""
    texts = []
    for twin in (jg, tg):
        status, out, err = run(twin.main, ["--checkpoint", str(model_dir), "--prompt", "All:", *GREEDY],
                               monkeypatch, capsys)
        assert status == 0, err
        text = out.getvalue()
        assert text.startswith("All:") and text.endswith("\n")
        assert len(text) == len("All:") + 40 + 1  # char tokenizer: one character per token
        assert out.writes >= 4  # prompt, first token, then 16-token segments
        texts.append(text)
    assert texts[0] == texts[1]


def test_cli_generates_past_the_context_and_samples_with_a_seed(model_dir, monkeypatch, capsys):
    argv = ["--checkpoint", str(model_dir), "--prompt", "Speak", "--max-new-tokens", "60", "--top-k", "5",
            "--top-p", "0.9", "--temperature", "1.2", "--num-samples", "2", "--seed", "4"]
    status, out, err = run(jg.main, argv, monkeypatch, capsys)
    assert status == 0, err
    samples = out.getvalue().rstrip("\n").split("\n---------------\n")
    assert len(samples) == 2 and all(s.startswith("Speak") and len(s) == 65 for s in samples)
    assert samples[0] != samples[1]  # sample i uses seed + i
    assert run(jg.main, argv, monkeypatch, capsys)[1].getvalue() == out.getvalue()  # seeded


def test_cli_prompt_from_stdin_file_and_empty(model_dir, tmp_path, monkeypatch, capsys):
    base = ["--checkpoint", str(model_dir), "--temperature", "0", "--max-new-tokens", "5"]
    _, from_arg, _ = run(jg.main, [*base, "--prompt", "hear me"], monkeypatch, capsys)
    _, from_stdin, _ = run(jg.main, [*base, "--prompt", "-"], monkeypatch, capsys, stdin="hear me")
    (tmp_path / "p.txt").write_text("hear me", encoding="utf-8")
    _, from_file, _ = run(jg.main, [*base, "--prompt-file", str(tmp_path / "p.txt")], monkeypatch, capsys)
    assert from_arg.getvalue() == from_stdin.getvalue() == from_file.getvalue()
    status, empty, _ = run(jg.main, base, monkeypatch, capsys)  # no [eos] in this vocabulary: starts from "\n"
    assert status == 0 and len(empty.getvalue()) == 5 + 1
    _, newline, _ = run(jg.main, [*base, "--prompt", "\n"], monkeypatch, capsys)
    assert newline.getvalue() == "\n" + empty.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-1"], "top_k"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-0.5"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--num-samples", "0"], "num-samples"),
    (["--prompt", "Zebra"], "'Z' (U+005A)"),  # characters the char tokenizer has never seen
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file /nonexistent/prompt.txt does not exist"),
])
@pytest.mark.parametrize("twin", [jg, tg], ids=["jaxgpt", "torchgpt"])
def test_cli_bad_input_is_a_one_line_error(twin, args, message, model_dir, monkeypatch, capsys):
    status, out, err = run(twin.main, ["--checkpoint", str(model_dir), *args], monkeypatch, capsys)
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_missing_model_directory(tmp_path, monkeypatch, capsys):
    for twin in (jg, tg):
        status, _, err = run(twin.main, ["--checkpoint", str(tmp_path / "nope"), "--prompt", "a"],
                             monkeypatch, capsys)
        assert status == 2 and err.startswith("error: ") and "config.json" in err


def test_python_m_unknown_characters_exit_2_without_traceback(model_dir):
    """The real entry point: exit status 2, one line naming the characters."""
    proc = subprocess.run([sys.executable, "-m", "torchgpt.generate", "--checkpoint", str(model_dir),
                           "--prompt", "hear me, Zoë"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "'Z' (U+005A)" in proc.stderr and "'ë' (U+00EB)" in proc.stderr


def test_stream_api_stops_at_eos(model_dir):
    cfg, params, _ = jckpt.load_model(model_dir)
    free = sum(jg.stream(params, cfg, [0], max_new_tokens=30, temperature=0.0), [])
    eos = free[5]
    chunks = list(jg.stream(params, cfg, [0], max_new_tokens=30, temperature=0.0, eos_id=eos, rng=jax.random.PRNGKey(0)))
    flat = sum(chunks, [])
    assert flat == free[:free.index(eos) + 1]  # ends with the first eos
