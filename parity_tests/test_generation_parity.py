"""Generation parity: KV-cached decoding vs the full forward, jax vs torch
tokens, sampling filters, eos and padding, the context limit, model dirs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, max_diff, small, twins

import jaxgpt.checkpoint as jckpt
import jaxgpt.generate as jg
import jaxgpt.model as jm
import torchgpt.checkpoint as tckpt
import torchgpt.generate as tg
import torchgpt.model as tm
from gptcore.generation import GenerationError, check_sampling
from gptcore.presets import load_model_config, preset_names

# Left-padded prompts of lengths 3, 7 and 5: row b is padding for t < 7 - length.
PROMPTS = np.array([[0, 0, 0, 0, 11, 12, 13],
                    [21, 22, 23, 24, 25, 26, 27],
                    [0, 0, 31, 32, 33, 34, 35]], np.int32)
VALID = np.array([[False] * 4 + [True] * 3, [True] * 7, [False] * 2 + [True] * 5])


def jax_generate(cfg, params, prompts=PROMPTS, valid=VALID, **kw):
    return np.asarray(jg.generate(params, cfg, prompts, valid, **kw))


def torch_generate(tmodel, prompts=PROMPTS, valid=VALID, **kw):
    return tg.generate(tmodel, prompts, valid, **kw).numpy()


# -- the KV cache ------------------------------------------------------------

CACHE_CONFIGS = ["seed001_mini", "mixtral"]  # learned positions + fused qkv; rope + GQA + MoE


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_cached_decode_logits_equal_full_forward_at_every_step(name):
    """Prefill the padded prompts, feed 8 more tokens one at a time: every
    step's logits equal the full forward over the whole sequence (both twins),
    and the twins' cached logits agree."""
    cfg = small(load_model_config(name))
    tmodel, params = twins(cfg)
    steps = 8
    more = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, steps)).astype(np.int32)
    tokens = np.concatenate([PROMPTS, more], axis=1)  # (B, P + steps)
    valid = np.concatenate([VALID, np.ones((3, steps), bool)], axis=1)
    P = PROMPTS.shape[1]

    positions = np.array(jg.prompt_positions(jnp.asarray(valid)))  # a writable copy for torch
    assert (positions[0, 4:] == np.arange(3 + steps)).all()  # padding does not shift positions
    full_j = np.asarray(jax.jit(jm.GPT(cfg).apply)({"params": params}, jnp.asarray(tokens),
                                                   positions=jnp.asarray(positions), valid=jnp.asarray(valid)).logits)
    with torch.no_grad():
        full_t = tmodel(torch.as_tensor(tokens).long(), positions=torch.as_tensor(positions).long(),
                        valid=torch.as_tensor(valid)).logits.numpy()

    cache_j = jm.init_cache(cfg, 3, P + steps)
    logits_j, cache_j = jax.jit(jg.prefill, static_argnums=1)(params, cfg, jnp.asarray(PROMPTS), jnp.asarray(VALID),
                                                              cache_j)
    cache_t = tm.init_cache(cfg, 3, P + steps)
    with torch.no_grad():
        logits_t, cache_t = tg.prefill(tmodel, torch.as_tensor(PROMPTS).long(), torch.as_tensor(VALID), cache_t)
    step_j = jax.jit(jg.decode_step, static_argnums=1)
    for i in range(steps):
        assert max_diff(logits_j, full_j[:, P - 1 + i]) <= TOL
        assert max_diff(logits_t, full_t[:, P - 1 + i]) <= TOL
        assert max_diff(logits_j, logits_t) <= TOL
        pos = positions[:, P + i]
        logits_j, cache_j = step_j(params, cfg, cache_j, jnp.asarray(more[:, i]), jnp.asarray(pos))
        with torch.no_grad():
            logits_t, cache_t = tg.decode_step(tmodel, cache_t, torch.as_tensor(more[:, i]).long(),
                                               torch.as_tensor(pos).long())
    assert max_diff(logits_j, full_j[:, -1]) <= TOL and max_diff(logits_t, full_t[:, -1]) <= TOL


# -- greedy tokens across the twins ------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_greedy_tokens_identical_across_twins(name):
    cfg = small(load_model_config(name))
    tmodel, params = twins(cfg)
    n = min(10, cfg.context_length - PROMPTS.shape[1])
    tokens_j = jax_generate(cfg, params, max_new_tokens=n, temperature=0.0)
    tokens_t = torch_generate(tmodel, max_new_tokens=n, temperature=0.0)
    assert tokens_j.shape == (3, n)
    np.testing.assert_array_equal(tokens_j, tokens_t)


DEBUG = small(load_model_config("debug"))


def test_cached_generation_equals_no_cache_reference():
    """The same sampled tokens with and without the cache (the same rng /
    generator state gives the same draws from the same logits)."""
    tmodel, params = twins(DEBUG)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9)
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(jax_generate(DEBUG, params, rng=key, **kw),
                                  np.asarray(jg.generate_reference(params, DEBUG, PROMPTS, VALID, rng=key, **kw)))
    cached = tg.generate(tmodel, PROMPTS, VALID, generator=torch.Generator().manual_seed(7), **kw)
    ref = tg.generate_reference(tmodel, PROMPTS, VALID, generator=torch.Generator().manual_seed(7), **kw)
    np.testing.assert_array_equal(cached.numpy(), ref.numpy())


def test_sampling_is_seedable_and_top_k_1_is_greedy():
    tmodel, params = twins(DEBUG)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9)  # the compiles of the test above
    a = jax_generate(DEBUG, params, rng=jax.random.PRNGKey(1), **kw)
    assert (a == jax_generate(DEBUG, params, rng=jax.random.PRNGKey(1), **kw)).all()
    assert (a != jax_generate(DEBUG, params, rng=jax.random.PRNGKey(2), **kw)).any()
    g = lambda seed: torch.Generator().manual_seed(seed)
    b = torch_generate(tmodel, generator=g(1), **kw)
    assert (b == torch_generate(tmodel, generator=g(1), **kw)).all()
    assert (b != torch_generate(tmodel, generator=g(2), **kw)).any()
    greedy = jax_generate(DEBUG, params, max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(jax_generate(DEBUG, params, max_new_tokens=12, top_k=1), greedy)
    np.testing.assert_array_equal(torch_generate(tmodel, max_new_tokens=12, top_k=1, generator=g(0)), greedy)


# -- the filters -------------------------------------------------------------

def masks(logits, **settings):
    """Kept-token masks of both twins' filter_logits, checked equal (and the
    kept values equal to 1e-6, relative: one float32 ulp)."""
    s = check_sampling(**settings)
    out_j = np.asarray(jg.filter_logits(jnp.asarray(logits, jnp.float32), *s))
    out_t = tg.filter_logits(torch.as_tensor(np.asarray(logits, np.float32)), *s).numpy()
    kept_j, kept_t = np.isfinite(out_j), np.isfinite(out_t)
    np.testing.assert_array_equal(kept_j, kept_t)
    assert np.all(np.isneginf(out_j[~kept_j]))
    np.testing.assert_allclose(out_j[kept_j], out_t[kept_t], rtol=1e-6, atol=1e-6)  # XLA divides by multiplying
    return kept_j


PROBS = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))  # sorted: 0.5, 0.3, 0.15, 0.05


@pytest.mark.parametrize("top_p, kept", [
    (0.4, [0, 1, 0, 0]),  # the first token alone already reaches p
    (0.6, [0, 1, 0, 1]),  # 0.5 < 0.6: the token crossing p (0.3) is kept, the next is not
    (0.79, [0, 1, 0, 1]),
    (0.81, [0, 1, 1, 1]),  # 0.8 < 0.81: 0.15 crosses
    (0.96, [1, 1, 1, 1]),
    (1.0, [1, 1, 1, 1]),  # off
])
def test_top_p_keeps_the_token_that_crosses_p(top_p, kept):
    assert masks(PROBS, top_p=top_p)[0].tolist() == [bool(k) for k in kept]


def test_top_p_keeps_ties_of_the_crossing_token():
    probs = np.log(np.array([[0.2, 0.4, 0.2, 0.2]]))
    assert masks(probs, top_p=0.5).tolist() == [[True] * 4]  # 0.4 + one 0.2 crosses; its ties stay
    assert masks(probs, top_p=0.3).tolist() == [[False, True, False, False]]


def test_top_k_keeps_ties_at_the_kth_value():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert masks(logits, top_k=1).tolist() == [[True, False, False, False, False]]
    assert masks(logits, top_k=2).tolist() == [[True, False, True, True, False]]  # 3 tokens: the tie stays
    assert masks(logits, top_k=4).tolist() == [[True, True, True, True, False]]
    assert masks(logits, top_k=9).all() and masks(logits, top_k=0).all()  # k >= V and 0: off


def test_greedy_filter_keeps_the_first_argmax():
    logits = np.array([[1.0, 3.0, 3.0, 0.0]])
    assert masks(logits, temperature=0.0).tolist() == [[False, True, False, False]]
    assert int(jg.sample_token(jnp.asarray(logits), None, check_sampling(0.0))[0]) == 1
    assert int(tg.sample_token(torch.as_tensor(logits), None, check_sampling(0.0))[0]) == 1


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.9), dict(temperature=1.3, top_k=20, top_p=0.8),
    dict(temperature=0.5, top_p=0.5), dict(top_k=3, top_p=0.99)])
def test_filter_masks_identical_on_random_logits(settings):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (64, 100))
    logits[:8, :10] = 5.0  # ties at the top
    kept = masks(logits, **settings)
    assert kept.any(axis=-1).all()
    assert kept.all() == (set(settings) == {"temperature"})  # only top-k / top-p remove tokens


def test_temperature_order_temperature_then_top_k_then_top_p():
    """top-p sees the temperature-scaled, top-k-filtered distribution."""
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    assert masks(logits, top_p=0.65).tolist() == [[True, True, False, False]]
    # temperature 3 flattens to ~(0.30, 0.27, 0.24, 0.19): 0.65 now needs three tokens
    assert masks(logits, temperature=3.0, top_p=0.65).tolist() == [[True, True, True, False]]
    # top-k 2 first: renormalised (0.57, 0.43), the second crosses 0.65
    assert masks(logits, top_k=2, top_p=0.65).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("settings", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                                      dict(top_p=0.0), dict(top_p=1.5), dict(top_k=2.5)])
def test_bad_sampling_settings_raise(settings):
    with pytest.raises(GenerationError):
        check_sampling(**settings)


# -- eos and padding ---------------------------------------------------------

def test_eos_and_padding_identical_across_twins():
    """Row 1 emits eos, then only pad, while the other rows go on; rows of a
    padded batch equal each prompt generated alone."""
    tmodel, params = twins(DEBUG)
    free = jax_generate(DEBUG, params, max_new_tokens=12, temperature=0.0)
    eos = int(free[1, 3])
    first = int(np.argmax(free[1] == eos))  # the first time row 1 emits it
    kw = dict(max_new_tokens=12, temperature=0.0, eos_id=eos, pad_id=DEBUG.vocab_size - 1)
    tokens_j = jax_generate(DEBUG, params, **kw)
    np.testing.assert_array_equal(tokens_j, torch_generate(tmodel, **kw))
    assert tokens_j[1, first] == eos and (tokens_j[1, first + 1:] == DEBUG.vocab_size - 1).all()
    for b in range(3):
        row_stop = np.argmax(free[b] == eos) if (free[b] == eos).any() else 12
        np.testing.assert_array_equal(tokens_j[b, :row_stop + 1], free[b, :row_stop + 1])
        alone = PROMPTS[b:b + 1, ~VALID[b]].size
        prompt = PROMPTS[b:b + 1, alone:]
        np.testing.assert_array_equal(jax_generate(DEBUG, params, prompt, None, **kw)[0], tokens_j[b])
        np.testing.assert_array_equal(torch_generate(tmodel, prompt, None, **kw)[0], tokens_j[b])


def test_all_rows_done_stops_early_and_pads():
    tmodel, params = twins(DEBUG)
    prompt = PROMPTS[1:2]
    free = jax_generate(DEBUG, params, prompt, None, max_new_tokens=6, temperature=0.0)
    kw = dict(max_new_tokens=6, temperature=0.0, eos_id=int(free[0, 0]))
    expected = [[free[0, 0]] * 6]  # eos first, then eos as the default pad
    np.testing.assert_array_equal(jax_generate(DEBUG, params, prompt, None, **kw), expected)
    np.testing.assert_array_equal(torch_generate(tmodel, prompt, None, **kw), expected)


# -- the context limit -------------------------------------------------------

def test_context_limit_errors_before_generating():
    tmodel, params = twins(DEBUG)
    n = DEBUG.context_length - PROMPTS.shape[1] + 1
    with pytest.raises(GenerationError, match="context_length"):
        jg.generate(params, DEBUG, PROMPTS, VALID, max_new_tokens=n)
    with pytest.raises(GenerationError, match="context_length"):
        tg.generate(tmodel, PROMPTS, VALID, max_new_tokens=n)
    with pytest.raises(GenerationError, match="left-padded"):
        jg.generate(params, DEBUG, PROMPTS[:, ::-1], VALID[:, ::-1], max_new_tokens=2)
    assert jax_generate(DEBUG, params, max_new_tokens=n - 1, temperature=0.0).shape == (3, n - 1)


def test_stream_slides_past_the_context_identically():
    """stream() serves 3x the context: the twins' greedy tokens agree, and the
    part within the context equals one-shot generate."""
    cfg = small(load_model_config("seed001_mini"), context_length=16)
    tmodel, params = twins(cfg)
    prompt = [5, 6, 7, 8, 9]
    chunks_j = list(jg.stream(params, cfg, prompt, max_new_tokens=48, temperature=0.0, chunk=4))
    chunks_t = list(tg.stream(tmodel, prompt, max_new_tokens=48, temperature=0.0, chunk=4))
    flat_j = sum(chunks_j, [])
    assert len(flat_j) == 48 and len(chunks_j) > 2 and flat_j == sum(chunks_t, [])
    # before the first slide (position 13: 13 + chunk 4 > 16) nothing differs from one-shot generate
    within = jax_generate(cfg, params, np.array([prompt]), None, max_new_tokens=11, temperature=0.0)
    assert flat_j[:9] == within[0, :9].tolist()
    long_prompt = list(range(40))  # longer than the context: cropped to the last 16 tokens
    assert (list(jg.stream(params, cfg, long_prompt, max_new_tokens=5, temperature=0.0))
            == list(jg.stream(params, cfg, long_prompt[-16:], max_new_tokens=5, temperature=0.0)))


# -- model directories -------------------------------------------------------

def test_model_directories_load_in_both_twins(tmp_path):
    """jaxgpt.save_model writes model.safetensors (torchgpt reads it); a
    torchgpt directory loads in jaxgpt; logits agree."""
    tmodel, params = twins(DEBUG)
    tokens = PROMPTS[1:]
    jckpt.save_model(tmp_path / "j", params, DEBUG)
    cfg_t, loaded_t, _ = tckpt.load_model(tmp_path / "j")
    assert cfg_t == DEBUG and not loaded_t.training
    tckpt.save_model(tmp_path / "t", tmodel, DEBUG)
    cfg_j, loaded_j, _ = jckpt.load_model(tmp_path / "t")
    with torch.no_grad():
        want = tmodel(torch.as_tensor(tokens).long()).logits.numpy()
        assert max_diff(loaded_t(torch.as_tensor(tokens).long()).logits, want) == 0.0
    got = jm.GPT(cfg_j).apply({"params": loaded_j}, jnp.asarray(tokens)).logits
    assert max_diff(got, want) <= TOL
    with pytest.raises(tckpt.CheckpointError, match="already exists"):
        tckpt.save_model(tmp_path / "t", tmodel, DEBUG)
    with pytest.raises(tckpt.CheckpointError, match="no config.json"):
        tckpt.load_model(tmp_path)
