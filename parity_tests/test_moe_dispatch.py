"""Mixture-of-experts dispatch: `model.moe_impl` = dense | capacity | ragged
computes one function. `dense` (every expert on every token, combined by
the routing weights) is the oracle; `capacity` (sort-based dispatch into
per-expert buffers) with room for every token and `ragged` (dropless,
sorted rows, jax.lax.ragged_dot; torch: a loop over the sorted groups) equal
it in logits, aux loss and every gradient, in both twins, and each twin's
implementation equals the other's. With a capacity small enough to drop,
both twins drop the same assignments (by expert, then batch row, then
position) and agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_diff, small, tokens_for, twins

import jaxgpt.model as jm
import jaxgpt.ops as jops
import torchgpt.ffn as tffn
import torchgpt.model as tm
import torchgpt.ops as tops
from gptcore.presets import load_model_config

PRESETS = ("seed002_moe", "seed002_moe_shared", "mixtral")
IMPLS = ("capacity", "ragged")


def preset(name: str, **changes):
    cfg = small(load_model_config(name), aux_loss_coef=0.01, router_z_loss=0.001, **changes)
    return cfg.replace(capacity_factor=cfg.n_experts / cfg.top_k)  # capacity = tokens: nothing dropped


def use(tmodel, cfg) -> None:
    """Switch a torch model's MoE layers to cfg's implementation (same weights)."""
    for module in tmodel.modules():
        if isinstance(module, tm.MoE):
            module.cfg = cfg


def jax_loss_and_grads(cfg, params, x, y, valid):
    def loss(p):
        out = jm.GPT(cfg).apply({"params": p}, jnp.asarray(x), valid=jnp.asarray(valid))
        ce = jops.cross_entropy(out.logits, jnp.asarray(y), jnp.asarray(valid))
        return ce + cfg.aux_loss_coef * out.aux_loss + cfg.router_z_loss * out.z_loss, out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return (np.asarray(out.logits), float(out.aux_loss), float(out.z_loss), np.asarray(out.routing)), \
        jm.state_arrays(grads)


def torch_loss_and_grads(tmodel, x, y, valid):
    tmodel.zero_grad()
    out = tmodel(torch.from_numpy(x).long(), valid=torch.from_numpy(valid))
    loss = tops.cross_entropy(out.logits, torch.from_numpy(y).long(), torch.from_numpy(valid))
    c = tmodel.cfg
    (loss + c.aux_loss_coef * out.aux_loss + c.router_z_loss * out.z_loss).backward()
    grads = {name: p.grad.numpy().copy() for name, p in tmodel.named_parameters()}
    return (out.logits.detach().numpy(), float(out.aux_loss.detach()), float(out.z_loss.detach()),
            out.routing.detach().numpy()), grads


def batch(cfg):
    tokens = tokens_for(cfg, batch=3, length=17)
    x, y = tokens[:, :-1], tokens[:, 1:]
    valid = np.ones(x.shape, bool)
    valid[1, 9:] = False
    return x, y, valid


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-6)
        assert max_diff(got[name], want[name]) / scale <= 1e-5, (what, name)


@pytest.mark.parametrize("name", PRESETS)
def test_every_implementation_computes_the_dense_function(name):
    """Per twin: capacity (with room) and ragged equal dense; across twins:
    each implementation equals the other twin's."""
    dense = preset(name)
    tmodel, params = twins(dense)
    x, y, valid = batch(dense)
    jout, jgrads = jax_loss_and_grads(dense, params, x, y, valid)
    tout, tgrads = torch_loss_and_grads(tmodel, x, y, valid)
    assert max_diff(jout[0], tout[0]) <= 1e-5
    assert jout[2] > 0.0 and abs(jout[2] - tout[2]) <= 1e-6 * jout[2]  # the router z-loss, in the objective
    routing = jout[3]  # shares of the valid assignments: E experts, then dropped (none: dense drops nothing)
    assert routing.shape == (dense.n_experts + 1,) and routing[-1] == 0.0 and abs(routing.sum() - 1) <= 1e-6
    for impl in IMPLS:
        cfg = dense.replace(moe_impl=impl)
        use(tmodel, cfg)
        try:
            iout, igrads = jax_loss_and_grads(cfg, params, x, y, valid)
            sout, sgrads = torch_loss_and_grads(tmodel, x, y, valid)
        finally:
            use(tmodel, dense)
        for got, want, what in ((iout, jout, f"jax {impl}"), (sout, tout, f"torch {impl}"),
                                (iout, sout, f"jax vs torch {impl}")):
            assert max_diff(got[0], want[0]) <= 1e-5, what
            assert abs(got[1] - want[1]) <= 1e-6 and abs(got[2] - want[2]) <= 1e-6 * want[2], what
            np.testing.assert_allclose(got[3], want[3], atol=1e-7, err_msg=what)  # routing shares, padding excluded
        assert_grads_close(igrads, jgrads, f"jax {impl}")
        assert_grads_close(sgrads, tgrads, f"torch {impl}")
        assert_grads_close(igrads, sgrads, f"jax vs torch {impl}")


@pytest.mark.parametrize("name", ["seed002_moe", "mixtral"])  # expert biases, and none
def test_torch_ragged_grouped_mm_equals_its_loop(name, monkeypatch):
    """torchgpt's ragged path runs torch._grouped_mm where torch has it, else
    a loop over the experts' runs of rows: the same function, gradients
    included."""
    assert tffn.GROUPED_MM  # the installed torch has it: this test compares the two paths
    cfg = preset(name, moe_impl="ragged")
    tmodel, _ = twins(cfg.replace(moe_impl="dense"))
    use(tmodel, cfg)
    x, y, valid = batch(cfg)
    grouped, ggrads = torch_loss_and_grads(tmodel, x, y, valid)
    monkeypatch.setattr(tffn, "GROUPED_MM", False)
    loop, lgrads = torch_loss_and_grads(tmodel, x, y, valid)
    assert max_diff(grouped[0], loop[0]) <= 1e-5 and abs(grouped[1] - loop[1]) <= 1e-6
    assert_grads_close(ggrads, lgrads, "grouped_mm vs loop")


def test_dispatch_plans_are_identical_and_drop_in_order():
    """Both twins' dispatch, per group (a sequence): assignments sorted by
    expert, each expert's in token order; the first `capacity` keep a slot.
    Ties among router logits included (route's lower-index rule)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 20, 4)).astype(np.float32)
    logits[:, ::3, 2] = logits[:, ::3, 0]  # ties
    weights, idx = jops.route(jnp.asarray(logits), 2)
    tweights, tidx = tops.route(torch.from_numpy(logits), 2)
    assert np.array_equal(np.asarray(idx), tidx.numpy())
    for capacity in (20, 6, 2):
        j = jops.dispatch(idx, weights, 4, capacity)
        t = tops.dispatch(tidx, tweights, 4, capacity)
        for field in ("token", "expert", "slot", "sizes"):
            assert np.array_equal(np.asarray(getattr(j, field)), getattr(t, field).numpy()), (capacity, field)
        np.testing.assert_allclose(np.asarray(j.weight), t.weight.numpy(), rtol=1e-6)
        for g in range(2):
            token, expert, slot = (np.asarray(getattr(j, f))[g] for f in ("token", "expert", "slot"))
            assert np.all(np.diff(expert) >= 0)
            for e in range(4):
                mine = token[expert == e]
                assert np.all(np.diff(mine) > 0)  # token order within an expert
                kept = slot[expert == e] < 4 * capacity
                assert kept.sum() == min(capacity, len(mine)) and kept[:capacity].all()  # the first keep slots
            assert np.array_equal(np.bincount(np.asarray(idx)[g].ravel(), minlength=4), np.asarray(j.sizes)[g])


def test_dropping_tokens_is_the_same_in_both_twins():
    """capacity_factor 0.5: a quarter of the assignments at least find no
    room; the logits still agree, and a token dropped by all its experts
    gets only the shared expert's output from the MoE layer."""
    cfg = preset("seed002_moe_shared").replace(moe_impl="capacity", capacity_factor=0.5)
    tmodel, params = twins(cfg.replace(moe_impl="dense"))
    use(tmodel, cfg)
    try:
        x, _, valid = batch(cfg)
        jout = jm.GPT(cfg).apply({"params": params}, jnp.asarray(x), valid=jnp.asarray(valid))
        with torch.no_grad():
            tout = tmodel(torch.from_numpy(x).long(), valid=torch.from_numpy(valid))
        jlogits = jout.logits
        assert max_diff(jlogits, tout.logits) <= 1e-5
        np.testing.assert_allclose(np.asarray(jout.routing), tout.routing.numpy(), atol=1e-7)
        assert float(jout.routing[-1]) >= 0.25 and abs(float(jout.routing.sum()) - 1) <= 1e-6
        dense_logits = jm.GPT(cfg.replace(moe_impl="dense")).apply({"params": params}, jnp.asarray(x)).logits
        assert max_diff(jlogits, dense_logits) > 1e-3  # something was dropped
    finally:
        use(tmodel, cfg.replace(moe_impl="dense"))

    layer = jm.MoE(cfg)
    moe_params = params["blocks_0"]["mlp"]
    h = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, cfg.d_model)).astype(np.float32))
    valid = np.ones((2, 8), bool)
    valid[1, 6:] = False  # padding: its assignments count nowhere
    out, _, _, shares = layer.apply({"params": moe_params}, h, jnp.asarray(valid))
    shared = jm.MLP(cfg).apply({"params": moe_params["shared_expert"]}, h)
    logits = h @ moe_params["router"]["kernel"] + moe_params["router"].get("bias", 0.0)
    weights, idx = jops.route(logits, cfg.top_k)
    cap = cfg.expert_capacity(8)  # each sequence its own group
    plan = jops.dispatch(idx, weights, cfg.n_experts, cap)
    dropped = np.ones((2, 8), bool)
    for g in range(2):
        dropped[g, np.asarray(plan.token)[g][np.asarray(plan.slot)[g] < cfg.n_experts * cap]] = False
    assert dropped.any()
    np.testing.assert_allclose(np.asarray(out)[dropped], np.asarray(shared)[dropped], atol=1e-6)
    # the layer's routing shares, counted here from its plan: valid assignments per expert kept, then dropped
    kept = np.asarray(plan.slot) < cfg.n_experts * cap
    counted = np.take_along_axis(valid, np.asarray(plan.token), 1)
    want = np.bincount(np.asarray(plan.expert)[kept & counted], minlength=cfg.n_experts).tolist()
    want = np.array(want + [np.sum(~kept & counted)]) / counted.sum()
    np.testing.assert_allclose(np.asarray(shares), want, atol=1e-7)


def test_capacity_is_one_formula():
    cfg = load_model_config("mixtral").replace(capacity_factor=1.25)
    assert cfg.expert_capacity(1000) == 313  # ceil(1.25 * 1000 * 2 / 8)
    assert cfg.replace(capacity_factor=4.0).expert_capacity(1000) == 1000  # at most every token
