"""The chunked cross-entropy (train.loss_chunk) against the plain loss over
materialised logits, in each twin and across twins: values (fp32, 1e-6) and
gradients of every input (5e-6 of the largest: the chunked loss forms
softmax - one_hot itself), at the ops level and through each trainer's
loss_fn; and jaxgpt's chunked step never holds a (B, T, V) array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_diff, twins

import jaxgpt.model as jm
import jaxgpt.ops as jops
import jaxgpt.step as js
import torchgpt.ops as tops
import torchgpt.step as ts
from gptcore.config import ModelConfig
from gptcore.train_config import CHUNKED_LOSS_VOCAB, TrainConfig, loss_chunk


def rel(a, b) -> float:
    return max_diff(a, b) / max(float(np.abs(np.asarray(b)).max()), 1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_plain_in_both_twins(with_bias):
    """37 tokens a sequence in slices of 16: the last slice is padded."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 37, 24)).astype(np.float32)
    kernel = (rng.normal(size=(24, 300)) / 5).astype(np.float32)
    bias = rng.normal(size=300).astype(np.float32) if with_bias else None
    y = rng.integers(0, 300, (2, 37))
    valid = rng.random((2, 37)) > 0.2

    def jax_losses(h, k, b):
        plain = jops.cross_entropy(h @ k + (0.0 if b is None else b), jnp.asarray(y), jnp.asarray(valid))
        return plain, jops.chunked_cross_entropy(h, k, b, jnp.asarray(y), jnp.asarray(valid), 16)

    args = [jnp.asarray(a) for a in (h, kernel)] + [None if bias is None else jnp.asarray(bias)]
    jplain, jchunked = jax_losses(*args)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    jg_plain = jax.grad(lambda *a: jax_losses(*a)[0], argnums)(*args)
    jg_chunked = jax.grad(lambda *a: jax_losses(*a)[1], argnums)(*args)

    def torch_grads(chunked: bool):
        t = [torch.tensor(h, requires_grad=True), torch.tensor(kernel.T.copy(), requires_grad=True)]
        b = None if bias is None else torch.tensor(bias, requires_grad=True)
        ty, tv = torch.from_numpy(y), torch.from_numpy(valid)
        if chunked:
            loss = tops.chunked_cross_entropy(t[0], t[1], b, ty, tv, 16)
        else:
            loss = tops.cross_entropy(t[0] @ t[1].T + (0.0 if b is None else b), ty, tv)
        loss.backward()
        grads = [t[0].grad.numpy(), t[1].grad.numpy().T] + ([] if b is None else [b.grad.numpy()])
        return float(loss.detach()), grads

    tplain, tg_plain = torch_grads(False)
    tchunked, tg_chunked = torch_grads(True)
    assert abs(float(jchunked) - float(jplain)) <= 1e-6 * float(jplain)
    assert abs(tchunked - tplain) <= 1e-6 * tplain and abs(tchunked - float(jchunked)) <= 1e-6 * tchunked
    for jc, jp, tc, tp in zip(jg_chunked, jg_plain, tg_chunked, tg_plain):  # softmax - one_hot, formed
        assert rel(jc, jp) <= 5e-6 and rel(tc, tp) <= 5e-6 and rel(jc, tc) <= 5e-6  # explicitly: a few ulps


CFG = ModelConfig(vocab_size=CHUNKED_LOSS_VOCAB, context_length=16, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                  embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)


@pytest.mark.parametrize("tie", [True, False])
def test_trainers_loss_fn_chunked_equals_plain(tie):
    """Through each trainer's loss_fn, with tc.loss_chunk 16 (4 slices of a
    4 x 16 micro-batch) and 0: the same objective and parameter gradients."""
    cfg = CFG.replace(tie_embeddings=tie, lm_head_bias=not tie)
    assert loss_chunk(cfg.vocab_size, 64, 16) == 16 and loss_chunk(cfg.vocab_size - 1, 64, 16) == 0
    tmodel, params = twins(cfg)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 4, 16)).astype(np.int32)  # the trainers' batches are int32
    valid = np.ones((4, 16), bool)
    valid[2, 10:] = False
    n_total = float(valid.sum())

    def jax_run(chunk):
        def f(p):
            return js.loss_fn(p, jm.GPT(cfg), jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid),
                              jax.random.PRNGKey(0), n_total, 1, chunk)[0]
        value, grads = jax.value_and_grad(f)(params)
        return float(value), jm.state_arrays(grads)

    def torch_run(chunk):
        tmodel.zero_grad()
        objective, _ = ts.loss_fn(tmodel, torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(valid),
                                  torch.tensor(n_total), 1, chunk)
        objective.backward()
        return float(objective.detach()), {n: p.grad.numpy().copy() for n, p in tmodel.named_parameters()}

    runs = {(twin, chunk): run(chunk) for twin, run in (("jax", jax_run), ("torch", torch_run)) for chunk in (0, 16)}
    want = runs["jax", 0]
    for key, (value, grads) in runs.items():
        assert abs(value - want[0]) <= 1e-6 * want[0], key
        assert grads.keys() == want[1].keys()
        for name in grads:
            assert rel(grads[name], want[1][name]) <= 1e-5, (key, name)


def test_evaluation_chunked_equals_plain_in_both_twins():
    """The trainers' evaluation (step.eval_fn / evaluate in each twin) with
    loss_chunk 16 (4 slices of a 4 x 16 batch) and 0: one value, 1e-6."""
    tmodel, params = twins(CFG)
    rng = np.random.default_rng(2)
    batches = [tuple(rng.integers(0, CFG.vocab_size, (2, 4, 16)).astype(np.int32)) for _ in range(2)]
    got = {}
    for chunk in (0, 16):
        got["jax", chunk] = js.evaluate(lambda x, y: js.eval_loss(params, jm.GPT(CFG), jnp.asarray(x),
                                                                  jnp.asarray(y), chunk), batches)
        got["torch", chunk] = ts.evaluate(tmodel, batches, "cpu", chunk)
    want = got["jax", 0]
    for key, value in got.items():
        assert abs(value - want) <= 1e-6 * want, (key, value, want)


def test_jax_chunked_step_never_holds_the_full_logits():
    """The compiled train step with chunking has no (B, T, V) array anywhere
    in its program, and its temporaries are smaller than the plain step's."""
    cfg = CFG.replace(vocab_size=2 * CHUNKED_LOSS_VOCAB)
    params = jm.init_params(cfg, 0)
    batch = tuple(jnp.zeros((1, 8, 16), dt) for dt in (jnp.int32, jnp.int32, bool))

    def lowered(chunk):
        state = js.create_state(jm.GPT(cfg), params, TrainConfig(loss_chunk=chunk))
        return js.train_step.lower(state, batch, js.step_key(0, 0))

    full = "8x16x16384xf32"  # (B, T, V) in StableHLO's spelling
    plain, chunked = lowered(0), lowered(32)
    assert full in plain.as_text() and full not in chunked.as_text()
    temps = [lo.compile().memory_analysis().temp_size_in_bytes for lo in (plain, chunked)]
    assert temps[1] < temps[0] / 2, temps
