"""Token datasets (gptcore.prepare, python -m jaxgpt.prepare): every input
kind round-trips, the parallel encoding writes what one process writes, a
finished dataset is reused and a corrupted one refused, windows read across
shards are the windows of the joined stream, and a run trains from one."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SHAKESPEARE

import jaxgpt.prepare as jprepare
import jaxgpt.train as jtrain
import torchgpt.prepare as tprepare
from gptcore.corpus import sha256_file
from gptcore.data import DataError, RandomWindows
from gptcore.prepare import prepare
from gptcore.shards import VERIFIED, ShardedTokens, read_manifest
from gptcore.tokenizer import Tokenizer

DOCS = [d for d in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if d.strip()][:400]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(DOCS, 400)


def write_inputs(root: Path) -> dict[str, tuple[str, list[str]]]:
    """One corpus per input kind: spec -> the documents it holds, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root.mkdir()
    (root / "one.txt").write_text(DOCS[0])
    tree = root / "tree" / "sub"
    tree.mkdir(parents=True)
    (root / "tree" / "a.txt").write_text(DOCS[1])
    (tree / "b.txt").write_text(DOCS[2])
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[3:50]))
    with gzip.open(root / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in DOCS[50:90])
    pq.write_table(pa.table({"text": DOCS[90:130]}), root / "docs.parquet", row_group_size=7)
    hub = root / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[130:150]))
    many = root / "many"
    many.mkdir()
    for i in range(3):
        (many / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[150 + 80 * i:
                                                                                             230 + 80 * i]))
    return {"txt": (str(root / "one.txt"), DOCS[:1], "text"),
            "many": (str(many), DOCS[150:390], "text"),
            "tree": (str(root / "tree"), [DOCS[1], DOCS[2]], "text"),  # sorted paths: a.txt, then sub/b.txt
            "jsonl": (str(root / "docs.jsonl"), DOCS[3:50], "text"),
            "jsonl.gz": (str(root / "docs.jsonl.gz"), DOCS[50:90], "body"),
            "parquet": (str(root / "docs.parquet"), DOCS[90:130], "text"),
            "hf datasets": (f"hf:{hub}", DOCS[130:150], "text")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs") / "corpora")


def split_tokens(directory: Path, split: str) -> np.ndarray:
    tokens = ShardedTokens(directory, split)
    return tokens[np.arange(len(tokens))]


@pytest.mark.parametrize("kind", ["txt", "tree", "jsonl", "jsonl.gz", "parquet", "hf datasets"])
def test_every_input_kind_round_trips(kind, inputs, tok, tmp_path):
    spec, docs, field = inputs[kind]
    manifest = prepare(spec, tok, tmp_path / "ds", text_field=field, val_fraction=0.0, num_proc=1)
    ids = split_tokens(tmp_path / "ds", "train").tolist()
    assert ids[-1] == tok.eos_id
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
    parts = [ids[a + 1:b] for a, b in zip([-1, *ends[:-1]], ends)]  # each document's ids, eos between
    assert [tok.decode(part) for part in parts] == docs
    assert manifest["documents"] == len(docs) and manifest["dtype"] == "uint16"


def test_parallel_encoding_writes_what_one_process_writes(inputs, tok, tmp_path):
    """Two worker processes, small shards and a document-wise val split: the
    same manifest and shard bytes as one process (documents keep their order)."""
    spec = inputs["many"][0]
    one, two = (prepare(spec, tok, tmp_path / f"p{n}", num_proc=n, shard_tokens=3000, val_fraction=0.1,
                        val_split="documents", batch_bytes=2000) for n in (1, 2))
    assert one["splits"] == two["splits"] and one["files"] == two["files"]
    assert len(one["splits"]["train"]["shards"]) > 3 and one["splits"]["val"]["documents"] == 24
    for f in one["files"]:
        assert (tmp_path / "p1" / f["file"]).read_bytes() == (tmp_path / "p2" / f["file"]).read_bytes()


def test_windows_across_shards_are_the_joined_streams(inputs, tok, tmp_path):
    """A batch is a pure function of (seed, step) whether the tokens sit in
    one array or in files of about 1000 (closed at batch boundaries)."""
    prepare(inputs["jsonl"][0], tok, tmp_path / "ds", num_proc=1, shard_tokens=1000, val_fraction=0.0,
            batch_bytes=2000)
    sharded = ShardedTokens(tmp_path / "ds", "train")
    assert len(read_manifest(tmp_path / "ds")["files"]) > 3
    joined = split_tokens(tmp_path / "ds", "train")
    for step in range(5):
        a, b = (RandomWindows(t, 64, 8, seed=3).batch(step) for t in (sharded, joined))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_finished_dataset_is_reused_and_a_corrupted_one_refused(inputs, tok, tmp_path):
    spec = inputs["jsonl"][0]
    first = prepare(spec, tok, tmp_path / "ds", num_proc=1, val_fraction=0.1)
    shard = tmp_path / "ds" / first["files"][0]["file"]
    stamp = shard.stat().st_mtime_ns
    assert prepare(spec, tok, tmp_path / "ds", num_proc=1, val_fraction=0.1) == first
    assert shard.stat().st_mtime_ns == stamp  # reused, not rewritten
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum does not match"):
        read_manifest(tmp_path / "ds", verify=True)


def test_a_passed_check_is_not_repeated_until_a_file_changes(inputs, tok, tmp_path, monkeypatch):
    """Verification hashes each file once; later checks (a reused prepare, each
    training start from data.tokens) only stat them, until a file changes:
    then it is hashed again and a changed content refused, at a training
    start too. A file written in the last 2 s is hashed each time (its mtime
    could miss a change)."""
    import gptcore.shards as shards
    from gptcore.run import make_tokenizer
    from gptcore.train_config import DataConfig
    manifest = prepare(inputs["jsonl"][0], tok, tmp_path / "ds", num_proc=1, shard_tokens=1000, batch_bytes=2000)
    files = [tmp_path / "ds" / f["file"] for f in manifest["files"]]
    hashed = []
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    read_manifest(tmp_path / "ds", verify=True)
    read_manifest(tmp_path / "ds", verify=True)
    assert len(files) > 3 and hashed == [f.name for f in files] * 2  # just written: racy
    for f in files:
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 10**10))
    hashed.clear()
    for _ in range(3):
        read_manifest(tmp_path / "ds", verify=True)
    assert prepare(inputs["jsonl"][0], tok, tmp_path / "ds", num_proc=1, shard_tokens=1000,
                   batch_bytes=2000) == manifest  # reused
    assert hashed == [f.name for f in files]
    data = bytearray(files[2].read_bytes())
    data[3] ^= 1
    files[2].write_bytes(bytes(data))
    hashed.clear()
    with pytest.raises(DataError, match=f"{files[2].name}: its checksum does not match"):
        make_tokenizer(DataConfig(tokens=str(tmp_path / "ds")))
    assert hashed == [files[2].name]


@pytest.mark.parametrize("content, needle", [
    ('{"text": "fine"}\n{"body": "no text field"}\n', "bad.jsonl:2: no text field 'text'"),
    ('{"text": "fine"}\nnot json\n', "bad.jsonl:2: not a JSON record"),
    ("", "empty"),
])
def test_bad_input_is_one_line(content, needle, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(content)
    code = jprepare.main([f"data.corpus={tmp_path / 'bad.jsonl'}", "data.tokenizer=char", "data.num_proc=1",
                          "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "ds").exists()  # the directory it made is gone


def test_a_tokenizer_larger_than_the_model_is_one_line(inputs, tmp_path, capsys):
    code = jprepare.main(["--config", "debug", f"data.corpus={inputs['jsonl'][0]}", "data.tokenizer=bpe",
                          "data.bpe_vocab_size=300", "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "300 tokens, more than the model's vocab_size 64" in err[0], err
    assert not (tmp_path / "ds").exists()


def test_a_dataset_being_prepared_is_not_prepared_twice(inputs, tmp_path, capsys):
    from gptcore.lock import run_lock
    with run_lock(tmp_path / "ds"):  # as a prepare running elsewhere holds it
        code = jprepare.main([f"data.corpus={inputs['jsonl'][0]}", "data.tokenizer=char", "--out",
                              str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "one prepare per dataset directory" in err[0], err
    assert (tmp_path / "ds").is_dir()  # the other's directory stays


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]


def test_a_run_trains_from_a_token_dataset_as_from_its_corpus(inputs, tmp_path, capsys):
    """python -m jaxgpt.prepare, then python -m jaxgpt.train data.tokens=DIR: the
    run takes the dataset's tokenizer, --resume knows the dataset, and it
    trains exactly as a run given data.corpus with the same data settings."""
    corpus = inputs["many"][0]
    data = [f"data.corpus={corpus}", "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.val_fraction=0.1",
            "data.val_split=documents"]
    assert jprepare.main([*data, "data.num_proc=2", "--out", str(tmp_path / "ds")]) == 0
    args = ["--config", "debug", "model.vocab_size=auto", "train.max_steps=4", "train.eval_interval=2",
            "train.eval_batches=1", "train.sample_tokens=0", "train.log_interval=1"]
    assert jtrain.main([*args, f"data.tokens={tmp_path / 'ds'}", f"train.out_dir={tmp_path / 'run'}"]) == 0
    run_tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert run_tok.fingerprint == Tokenizer.load(tmp_path / "ds" / "tokenizer.json").fingerprint
    assert not (tmp_path / "run" / "data").exists()  # the shards are read where they are

    assert jtrain.main([*args, *data, f"train.out_dir={tmp_path / 'from_corpus'}"]) == 0
    own = read_manifest(tmp_path / "from_corpus" / "data")
    assert own["files"] == read_manifest(tmp_path / "ds")["files"] and own["splits"]["val"]["documents"] == 24
    assert losses(tmp_path / "from_corpus") == losses(tmp_path / "run") and len(losses(tmp_path / "run")) >= 6
    assert jtrain.main([*args, f"data.tokens={tmp_path / 'ds'}", f"train.out_dir={tmp_path / 'run'}", "--resume",
                        "train.max_steps=6"]) == 0


def test_a_long_document_is_encoded_in_pieces_as_a_whole(tok, tmp_path):
    """Documents longer than a batch are cut where byte-level BPE never
    merges across: their ids are those of the whole text."""
    doc = "\n\n".join(DOCS)
    (tmp_path / "long.txt").write_text(doc)
    prepare(str(tmp_path / "long.txt"), tok, tmp_path / "ds", num_proc=2, val_fraction=0.0, batch_bytes=3000)
    assert split_tokens(tmp_path / "ds", "train").tolist() == tok.encode(doc) + [tok.eos_id]


def test_fine_tuning_on_a_dataset_needs_the_models_tokenizer(inputs, tmp_path, capsys):
    """A dataset encoded with the source model's tokenizer.json (by
    torchgpt.prepare: the same command) fine-tunes it; one encoded with
    another tokenizer is one line naming the way out."""
    corpus = inputs["many"][0]
    base = ["--config", "debug", "model.vocab_size=auto", "train.max_steps=2", "train.eval_interval=2",
            "train.eval_batches=1", "train.sample_tokens=0"]
    assert jtrain.main([*base, f"data.corpus={SHAKESPEARE}", f"train.out_dir={tmp_path / 'src'}"]) == 0
    own = tmp_path / "src" / "model" / "tokenizer.json"
    for name, tokenizer, command in (("own", str(own), tprepare.main), ("other", "bpe", jprepare.main)):
        assert command([f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", "data.bpe_vocab_size=300",
                              "data.val_fraction=0.1", "data.num_proc=1", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    tune = [*base, f"train.init_from={tmp_path / 'src'}"]
    assert jtrain.main([*tune, f"data.tokens={tmp_path / 'own'}", f"train.out_dir={tmp_path / 'tuned'}"]) == 0
    assert jtrain.main([*tune, f"data.tokens={tmp_path / 'other'}", f"train.out_dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.tokens=") and f"data.tokenizer={own}" in err[-1], err
    assert not (tmp_path / "bad").exists()


KILLED_PREPARE = """
import sys
from gptcore.prepare import prepare
from gptcore.tokenizer import Tokenizer
prepare(sys.argv[1], Tokenizer.load(sys.argv[2]), sys.argv[3], num_proc=2, shard_tokens=20_000, batch_bytes=20_000,
        val_split="documents")
"""


def test_a_killed_prepare_resumes_to_the_same_dataset(tok, tmp_path):
    """kill -9 (the whole process group, workers included) once some files are
    done, then prepare again: the finished files are kept, not re-encoded, and
    the manifest and every file equal an uninterrupted prepare's."""
    corpus = tmp_path / "big.jsonl"
    with open(corpus, "w") as f:
        for i in range(30):
            f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    tok.save(tmp_path / "tok.json")
    run = [sys.executable, "-c", KILLED_PREPARE, str(corpus), str(tmp_path / "tok.json")]
    subprocess.run([*run, str(tmp_path / "whole")], check=True)
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    print(f"KILL_SEED={seed}")
    proc = subprocess.Popen([*run, str(tmp_path / "killed")], start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "killed" / ".progress.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.15))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "the prepare finished before the kill"
    progress = json.loads((tmp_path / "killed" / ".progress.json").read_text())
    kept = {f["file"]: (tmp_path / "killed" / f["file"]).stat().st_mtime_ns
            for r in progress["rounds"] for f in r["files"]}
    print(f"killed after {len(kept)} files")
    subprocess.run([*run, str(tmp_path / "killed")], check=True)
    whole, killed = (read_manifest(tmp_path / d, verify=True) for d in ("whole", "killed"))
    assert killed == whole and len(whole["files"]) > 10
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name != VERIFIED) == \
        sorted(p.name for p in (tmp_path / "whole").iterdir() if p.name != VERIFIED)  # its record: files' ages
    assert all((tmp_path / "killed" / name).stat().st_mtime_ns == stamp for name, stamp in kept.items())


def test_a_txt_file_streams_in_pieces_as_it_reads(tok, tmp_path):
    """A .txt document is read a few bytes at a time and cut at safe points:
    the pieces join to the text _decode_text reads (BOM dropped, CRLF as LF,
    multi-byte characters and CRLFs split across reads), each about `size`
    long, and their ids are the whole text's (paragraphs separated by blank
    lines only, and by three newlines, are cut where BPE cannot merge)."""
    from gptcore.corpus import _decode_text
    from gptcore.documents import pieces
    paragraphs = [d.replace("\n", " ") + " 汉字 ✨" for d in DOCS[:120]]
    text = "\n\n".join(paragraphs[:60]) + "\n\n\n" + "\n\n\n".join(paragraphs[60:])
    raw = b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8")
    (tmp_path / "doc.txt").write_bytes(raw)
    for size in (7, 64, 1000):
        got = list(pieces(str(tmp_path / "doc.txt"), size=size))
        assert "".join(p[0] for p in got) == _decode_text(raw, "doc") == text
        assert [p[1:] for p in got] == [(True, len(got) == 1)] + [(False, False)] * (len(got) - 2) + [(False, True)]
        assert len(got) > 3 and max(len(p[0]) for p in got[:-1]) < size + 2000
    prepare(str(tmp_path / "doc.txt"), tok, tmp_path / "ds", num_proc=1, val_fraction=0.0, batch_bytes=500)
    assert split_tokens(tmp_path / "ds", "train").tolist() == tok.encode(text) + [tok.eos_id]
    for bad, needle in ((raw[:1001] + b"\0" + raw[1001:], "NUL byte at offset 1001"),
                        (raw[:1002] + b"\xe9" + raw[1002:], "byte 0xe9 at offset 1002")):
        (tmp_path / "bad.txt").write_bytes(bad)
        with pytest.raises(DataError, match=needle):
            list(pieces(str(tmp_path / "bad.txt"), size=7))
