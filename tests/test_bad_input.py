"""Bad input, across every command line and the Python API: each case is a
one-line `error: ...` naming the cause (no traceback), a non-zero exit, and
no user file overwritten or deleted (every file under the user's directory
keeps its bytes and mtime). The CLIs run in-process through main(argv);
three cases also run as real subprocesses."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_preset

import jaxgpt.convert as convert
import jaxgpt.generate as jgen
import jaxgpt.train as jtrain
import torchgpt.generate as tgen
import torchgpt.model as tm
import torchgpt.train as ttrain
from gptcore.config import ConfigError, ModelConfig
from gptcore.data import DataError, RandomWindows
from gptcore.tokenizer import Tokenizer, TokenizerError
from gptcore.weights import WeightsError
from jaxgpt.checkpoint import CheckpointError, load_model, save_model
from jaxgpt.model import load_state_arrays

TINY_MODEL = dict(context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
TINY_TRAIN = dict(batch_size=4, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=2,
                  sample_tokens=0)


class User:
    """The user's directory: a corpus, a preset, a finished run (checkpoints at
    steps 2 and 4, model/), the model as .pt and .safetensors, and odd files."""

    def __init__(self, root: Path):
        self.root = root
        self.preset = tiny_preset(root, 20_000, TINY_MODEL, TINY_TRAIN)
        self.corpus = root / "corpus.txt"
        self.run = root / "run"
        assert jtrain.main(["--config", str(self.preset), f"train.out_dir={self.run}"]) == 0
        self.model = self.run / "model"
        self.pt = convert.convert(self.model, root / "model.pt")
        self.safetensors = convert.convert(self.model, root / "model.safetensors")
        self.file = root / "notes.txt"  # a plain file: nothing can be written under it
        self.file.write_text("keep me\n")
        files = {"empty.txt": b"", "binary.txt": b"\x7fELF\x02\x01\x00\x00" * 64,
                 "latin1.txt": "café au lait, s'il vous plaît\n".encode("latin-1") * 50,
                 "short.txt": b"To be, or not.\n", "bad.toml": b"[train\nlr = 1\n",
                 "binary.toml": b"\xff\xfe[\x00t\x00]\x00", "prompt_latin1.txt": "caf\xe9".encode("latin-1"),
                 "garbage.safetensors": b"\x00" * 7}
        for name, data in files.items():
            (root / name).write_bytes(data)
        torch.save(torch.zeros(3), root / "tensor.pt")  # a .pt that is not a checkpoint
        (root / "empty_dir").mkdir()
        (root / "copies").mkdir()

    def copy(self, src: Path, name: str) -> Path:
        """A scratch copy (made before the snapshot, so it is the user's too)."""
        dst = self.root / "copies" / name
        shutil.copytree(src, dst)
        return dst


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> User:
    return User(tmp_path_factory.mktemp("user"))


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's checksum and mtime; a run directory's .lock (the trainers'
    own bookkeeping: the pid of the last trainer to hold it) is left out."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_one_line_error(code, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"exit status {code}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and needle in lines[0], err


# -- the command lines, in-process -----------------------------------------------------
def truncate_checkpoints(run: Path) -> Path:
    for p in (run / "checkpoints").rglob("*"):
        if p.is_file() and p.parent.name == "d":  # the array data files of every step
            p.write_bytes(p.read_bytes()[:5])
    return run


def truncate_weights(model: Path) -> Path:
    shutil.rmtree(model / "params")
    st = model / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    return model


def other_config(model: Path) -> Path:
    """A model directory whose config.json does not match its weights."""
    cfg = (model / "config.json").read_text().replace('"d_model": 16', '"d_model": 32')
    (model / "config.json").write_text(cfg)
    shutil.rmtree(model / "params")  # the safetensors path: both twins read it
    return model


def garbage_latest_pt(run: Path) -> Path:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return run


def wrong_shape_pt(root: Path) -> Path:
    cfg = ModelConfig(vocab_size=40, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    state = {k: torch.zeros(v.shape) for k, v in tm.GPT(cfg).state_dict().items()}
    state["tok_emb.weight"] = torch.zeros(41, 16)
    torch.save({"config": cfg.to_dict(), "model": state}, root / "wrong_shape.pt")
    return root / "wrong_shape.pt"


# name -> (main, argv built from the User, text the one line must contain).
# Each case gets its own fresh train.out_dir U.root/"out"/NAME where it matters.
def train_args(u: User, out: Path, *extra: str) -> list[str]:
    return ["--config", str(u.preset), f"train.out_dir={out}", *extra]


CASES = {
    # jaxgpt.train: config keys and values
    "train_unknown_key": (jtrain.main, lambda u, o: train_args(u, o, "model.d_modle=32"), "unknown key model.d_modle"),
    "train_unknown_section": (jtrain.main, lambda u, o: train_args(u, o, "optim.lr=1"), "unknown section 'optim'"),
    "train_override_without_value": (jtrain.main, lambda u, o: train_args(u, o, "train.lr"), "section.key=value"),
    "train_wrong_type": (jtrain.main, lambda u, o: train_args(u, o, 'train.batch_size="eight"'),
                         "batch_size: expected int"),
    "train_negative_size": (jtrain.main, lambda u, o: train_args(u, o, "train.batch_size=-4"),
                            "batch_size: must be positive"),
    "train_zero_layers": (jtrain.main, lambda u, o: train_args(u, o, "model.n_layers=0"), "n_layers"),
    "train_kv_heads_do_not_divide": (jtrain.main, lambda u, o: train_args(u, o, "model.n_kv_heads=3"), "n_kv_heads"),
    "train_val_fraction_out_of_range": (jtrain.main, lambda u, o: train_args(u, o, "data.val_fraction=1.5"),
                                        "val_fraction"),
    "train_unknown_choice": (jtrain.main, lambda u, o: train_args(u, o, "train.parallel=tpu"), "parallel: 'tpu'"),
    # numbers that cannot describe a run, and sizes no machine here holds: one line before any allocation
    "train_negative_seed": (jtrain.main, lambda u, o: train_args(u, o, "train.seed=-1"), "seed: must be in [0, 2**32)"),
    "train_seed_beyond_64_bits": (ttrain.main, lambda u, o: train_args(u, o, f"train.seed={2 ** 64}"),
                                  "seed: 18446744073709551616 does not fit in 64 bits"),
    "train_infinite_adam_eps": (jtrain.main, lambda u, o: train_args(u, o, "train.adam_eps=inf"),
                                "adam_eps: must be a finite number"),
    "train_infinite_norm_eps": (jtrain.main, lambda u, o: train_args(u, o, "model.norm_eps=inf"),
                                "norm_eps: must be a finite number"),
    "train_infinite_sample_temperature": (jtrain.main, lambda u, o: train_args(u, o, "train.sample_temperature=inf"),
                                          "sample_temperature: must be a finite number"),
    "train_into_the_current_directory": (jtrain.main, lambda u, o: train_args(u, o, 'train.out_dir=""'),
                                         "out_dir: must name a run directory"),
    "train_vocab_of_a_trillion": (jtrain.main, lambda u, o: train_args(u, o, f"model.vocab_size={10 ** 12}"),
                                  "the run needs at least"),
    "train_d_ff_of_ten_billion": (ttrain.main, lambda u, o: train_args(u, o, f"model.d_ff={10 ** 10}"),
                                  "the run needs at least"),
    "train_ten_million_experts": (jtrain.main, lambda u, o: train_args(u, o, f"model.n_experts={10 ** 7}"),
                                "the run needs at least"),
    "train_d_model_of_a_billion": (jtrain.main, lambda u, o: train_args(u, o, f"model.d_model={10 ** 9}",
                                                                        f"model.n_heads={10 ** 6}"),
                                   "the run needs at least"),
    "train_ten_million_layers": (jtrain.main, lambda u, o: train_args(u, o, f"model.n_layers={10 ** 7}"),
                                 "the run needs at least"),
    "train_batch_of_a_billion": (jtrain.main, lambda u, o: train_args(u, o, f"train.batch_size={10 ** 9}"),
                                 "a step's batch"),
    "train_a_billion_eval_batches": (jtrain.main, lambda u, o: train_args(u, o, f"train.eval_batches={10 ** 9}"),
                                     "the evaluation batches"),
    "train_malformed_toml": (jtrain.main, lambda u, o: ["--config", str(u.root / "bad.toml"), f"train.out_dir={o}"],
                             "not valid TOML"),
    "train_binary_toml": (jtrain.main, lambda u, o: ["--config", str(u.root / "binary.toml"), f"train.out_dir={o}"],
                          "not valid TOML"),
    "train_missing_preset": (jtrain.main, lambda u, o: ["--config", "no_such_preset", f"train.out_dir={o}"],
                             "no config file"),
    "train_processes_without_coordinator": (
        jtrain.main, lambda u, o: train_args(u, o, "--num-processes", "2", "--process-id", "1"), "need --coordinator"),
    "train_process_id_out_of_range": (
        jtrain.main, lambda u, o: train_args(u, o, "--coordinator", "127.0.0.1:9", "--num-processes", "2",
                                         "--process-id", "2"), "--process-id in [0, 2)"),
    "train_coordinator_without_port": (
        jtrain.main, lambda u, o: train_args(u, o, "--coordinator", "localhost", "--num-processes", "2"),
        "expected HOST:PORT"),
    "torch_train_multi_process": (ttrain.main, lambda u, o: train_args(u, o, "--num-processes", "2"),
                                  "one-process reference"),
    "train_bad_flag_value": (jtrain.main, lambda u, o: train_args(u, o, "--num-processes", "two"),
                             "invalid int value"),
    # jaxgpt.train: corpus
    "train_missing_corpus": (jtrain.main, lambda u, o: train_args(u, o, f"data.corpus={u.root / 'nope.txt'}"),
                             "does not exist"),
    "train_empty_corpus": (jtrain.main, lambda u, o: train_args(u, o, f"data.corpus={u.root / 'empty.txt'}"),
                           "is empty"),
    "train_binary_corpus": (jtrain.main, lambda u, o: train_args(u, o, f"data.corpus={u.root / 'binary.txt'}"),
                            "looks binary"),
    "train_non_utf8_corpus": (jtrain.main, lambda u, o: train_args(u, o, f"data.corpus={u.root / 'latin1.txt'}"),
                              "not UTF-8"),
    "train_corpus_shorter_than_a_block": (
        jtrain.main, lambda u, o: train_args(u, o, f"data.corpus={u.root / 'short.txt'}"), "block_size 16"),
    # jaxgpt.train: output directory, resume, fine-tuning
    "train_unwritable_out_dir": (jtrain.main, lambda u, o: train_args(u, u.file / "run"), "Not a directory"),
    "train_out_dir_holds_a_run": (jtrain.main, lambda u, o: train_args(u, u.run), "already holds a run"),
    "train_resume_nothing": (jtrain.main, lambda u, o: train_args(u, o, "--resume"), "nothing to resume"),
    "train_resume_truncated_checkpoints": (
        jtrain.main, lambda u, o: train_args(u, truncate_checkpoints(u.copy(u.run, "trunc_run")), "--resume"),
        "no checkpoint in"),
    "train_resume_other_config": (
        jtrain.main, lambda u, o: train_args(u, u.copy(u.run, "other_run"), "--resume", "model.d_model=32"),
        "the model changed since the run started (d_model 16 -> 32)"),
    "train_init_from_missing": (jtrain.main, lambda u, o: train_args(u, o, f"train.init_from={u.root / 'nope'}"),
                                "no config.json"),
    "train_init_from_empty_dir": (jtrain.main, lambda u, o: train_args(u, o, f"train.init_from={u.root / 'empty_dir'}"),
                                  "no config.json"),
    # torchgpt.train
    "torch_train_unknown_decay": (ttrain.main, lambda u, o: train_args(u, o, "train.decay=some"), "decay: 'some'"),
    "torch_train_parallel": (ttrain.main, lambda u, o: train_args(u, o, "train.parallel=pmap"), "single-device"),
    "torch_train_init_from_missing": (ttrain.main, lambda u, o: train_args(u, o, f"train.init_from={u.root / 'nope'}"),
                                      "no config.json"),
    "torch_train_resume_garbage_pt": (
        ttrain.main, lambda u, o: train_args(u, garbage_latest_pt(u.copy(u.run, "garbage_pt_run")), "--resume"),
        "latest.pt"),
    # generation, both twins
    "generate_unknown_prompt_char": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--prompt", "ROMEO☃"],
                                     "'☃' (U+2603)"),
    "torch_generate_unknown_prompt_char": (tgen.main, lambda u, o: ["--checkpoint", str(u.model), "--prompt", "€"],
                                           "'€' (U+20AC)"),
    "generate_negative_top_k": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--top-k", "-1"], "top_k"),
    "generate_top_p_above_one": (tgen.main, lambda u, o: ["--checkpoint", str(u.model), "--top-p", "1.5"], "top_p"),
    "generate_top_p_zero": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--top-p", "0"], "top_p"),
    "generate_negative_temperature": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--temperature", "-1"],
                                      "temperature"),
    "generate_top_k_not_a_number": (tgen.main, lambda u, o: ["--checkpoint", str(u.model), "--top-k", "abc"],
                                    "invalid int value: 'abc'"),
    "generate_nan_temperature": (tgen.main, lambda u, o: ["--checkpoint", str(u.model), "--temperature", "nan"],
                                 "temperature"),
    "generate_zero_samples": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--num-samples", "0"],
                              "--num-samples"),
    "generate_zero_new_tokens": (jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--max-new-tokens", "0"],
                                 "--max-new-tokens"),
    "generate_missing_checkpoint": (jgen.main, lambda u, o: ["--checkpoint", str(u.root / "nope")], "config.json"),
    "generate_empty_checkpoint_dir": (tgen.main, lambda u, o: ["--checkpoint", str(u.root / "empty_dir")],
                                      "config.json"),
    "generate_truncated_checkpoint": (
        jgen.main, lambda u, o: ["--checkpoint", str(truncate_weights(u.copy(u.model, "trunc_model")))],
        "cannot read model.safetensors"),
    "torch_generate_truncated_checkpoint": (
        tgen.main, lambda u, o: ["--checkpoint", str(truncate_weights(u.copy(u.model, "trunc_model2")))],
        "cannot load model.safetensors"),
    "generate_checkpoint_of_another_config": (
        jgen.main, lambda u, o: ["--checkpoint", str(other_config(u.copy(u.model, "other_model")))], "shape"),
    "generate_non_utf8_prompt_file": (
        jgen.main, lambda u, o: ["--checkpoint", str(u.model), "--prompt-file", str(u.root / "prompt_latin1.txt")],
        "cannot read prompt file"),
    # conversion
    "convert_onto_existing_file": (convert.main, lambda u, o: [u.model, u.pt], "already exists"),
    "convert_missing_source": (convert.main, lambda u, o: [u.root / "nope.pt", o / "x.pt"], "does not exist"),
    "convert_shape_mismatch": (convert.main, lambda u, o: [wrong_shape_pt(u.root / "copies"), o / "x.safetensors"],
                               "'tok_emb.weight' has shape (41, 16)"),
    "convert_unwritable_dst": (convert.main, lambda u, o: [u.pt, u.file / "x.safetensors"], "Not a directory"),
    "convert_dst_in_proc": (convert.main, lambda u, o: [u.pt, "/proc/x.pt"], "No such file or directory"),
    "convert_dst_dir_missing": (convert.main, lambda u, o: [u.model, "/proc/no_such_dir/x.pt"], "No such file"),
    "convert_truncated_safetensors": (convert.main, lambda u, o: [u.root / "garbage.safetensors", o / "x.pt"],
                                      "not a safetensors file"),
    "convert_pt_not_a_checkpoint": (convert.main, lambda u, o: [u.root / "tensor.pt", o / "x.safetensors"],
                                    "not a torchgpt checkpoint"),
    "convert_unknown_suffix": (convert.main, lambda u, o: [u.corpus, o / "x.pt"], "cannot tell its format"),
    "convert_unknown_target_format": (convert.main, lambda u, o: [u.pt, o / "x", "--to", "onnx"],
                                      "invalid choice: 'onnx'"),
}


def run_case(case: tuple, user: User, out: Path, capsys) -> int:
    """One (main, argv builder, needle) case: one error line naming the
    cause, every file of the user's unchanged, no half-made run; the exit status."""
    main, make_argv, needle = case
    argv = [str(a) for a in make_argv(user, out)]  # builds any broken copy first
    before = snapshot(user.root)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert_one_line_error(code, capsys.readouterr().err, needle)
    after = snapshot(user.root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten or deleted
    new = [k for k in after if k not in before]
    assert not any(k.endswith(("config.json", "metrics.jsonl")) for k in new), new  # no half-made run left
    assert not any("checkpoints" in k for k in new), new
    return code


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_input(name, user, capsys):
    run_case(CASES[name], user, user.root / "out" / name, capsys)


def test_unreachable_coordinator_is_one_line_within_its_timeout(user):
    """XLA's client aborts with a C++ stack when it cannot connect (after 5
    minutes by default): the trainer waits JAXGPT_COORDINATOR_TIMEOUT seconds
    for the coordinator to accept, then says so in one line."""
    import socket
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.train", *train_args(user, user.root / "out" / "coord"),
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAXGPT_COORDINATOR_TIMEOUT="3"))
    assert_one_line_error(proc.returncode, proc.stderr, f"cannot reach the coordinator at 127.0.0.1:{port} within 3 s")
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert not (user.root / "out" / "coord").exists()


# -- real subprocesses: the exit status and stderr the shell sees ------------------------
@pytest.mark.parametrize("module, argv, needle", [
    ("jaxgpt.train", lambda u: train_args(u, u.root / "out" / "sub", f"data.corpus={u.root / 'binary.txt'}"),
     "looks binary"),
    ("jaxgpt.generate", lambda u: ["--checkpoint", u.model, "--prompt", "ROMEO☃"], "U+2603"),
    ("jaxgpt.convert", lambda u: [u.safetensors, u.pt], "already exists"),
])
def test_subprocess_bad_input(module, argv, needle, user):
    before = snapshot(user.root)
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv(user))], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert proc.returncode == 2
    assert {k: v for k, v in snapshot(user.root).items() if k in before} == before


# -- the Python API ------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=40, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)

# name -> (exception type, call on the User, text the one-line message must contain)
API_CASES = {
    "config_kv_heads_do_not_divide": (ConfigError, lambda u: ModelConfig(n_heads=2, n_kv_heads=3), "n_kv_heads"),
    "config_negative_vocab": (ConfigError, lambda u: ModelConfig(vocab_size=-1), "vocab_size"),
    "load_model_empty_dir": (CheckpointError, lambda u: load_model(u.root / "empty_dir"), "no config.json"),
    "save_model_over_existing": (CheckpointError, lambda u: save_model(u.model, {}, TINY), "refusing to overwrite"),
    "tokenizer_garbage_json": (TokenizerError, lambda u: Tokenizer.load(u.root / "bad.toml"),
                               "not a valid tokenizer.json"),
    "tokenizer_unknown_char": (TokenizerError, lambda u: Tokenizer.load(u.model / "tokenizer.json").encode("☃"),
                               "U+2603"),
    "state_dict_shape_mismatch": (
        WeightsError, lambda u: load_state_arrays(
            {k: np.zeros((1, 1), np.float32) for k in convert.read_pt(u.pt).tensors}, TINY), "shape"),
    "windows_longer_than_tokens": (DataError, lambda u: RandomWindows(np.arange(10), 16, 4, 0), "needs 17"),
    "generate_past_the_context": (
        jgen.GenerationError, lambda u: jgen.generate({}, TINY, np.zeros((1, 10), np.int32), max_new_tokens=10),
        "context"),
    "convert_dst_is_src": (convert.FormatError, lambda u: convert.convert(u.pt, u.pt, force=True), "is the source"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_input(name, user):
    error, call, needle = API_CASES[name]
    before = snapshot(user.root)
    with pytest.raises(error) as info:
        call(user)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert {k: v for k, v in snapshot(user.root).items() if k in before} == before
