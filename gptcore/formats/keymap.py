"""Key maps: one `{}`-templated table per foreign format, both directions.

A table maps our torch-style names to a foreign format's names, torchtitan
style. "{}" stands for the layer index, a second "{}" for the expert index:

    "blocks.{}.attn.out_proj.weight": "model.layers.{}.self_attn.o_proj.weight",

A value may carry a named transform, `(foreign name(s), TRANSFORM)`; a value
may name several foreign tensors and a key several of ours:

    "blocks.{}.attn.qkv_proj.weight": (("model.layers.{}.self_attn.q_proj.weight", ...k, ...v), SPLIT_QKV)
    QKV_WEIGHTS: ("transformer.h.{}.attn.c_attn.weight", chain(FUSE_QKV, TRANSPOSE))

Every transform has its exact inverse, so the import direction is derived from
the same table: `to_foreign` applies the transforms, `from_foreign` their
inverses. `ignored` lists foreign-only keys dropped on import (attention mask
buffers, the tied copy of the embedding). Fewer "{}" on the foreign side than
on ours means the extra index is stacked into a leading axis (Mixtral's fused
experts). A table may hold alternative rules: for the same foreign key (our
fused or separate q/k/v; the one whose names the config has applies) or for
the same weights of ours (two foreign layouts; exporting writes the first,
importing reads the one on disk).
"""

from __future__ import annotations

import re
from itertools import product
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from gptcore.config import ModelConfig
from gptcore.formats import FormatError
from gptcore.formats.state import state_shapes
from gptcore.transforms import IDENTITY, TRANSPOSE, Transform, chain, invert  # noqa: F401  (the tables' vocabulary)


def _fuse_qkv(xs, cfg):  # q (H*D, ...), k (K*D, ...), v (K*D, ...) -> [q | k | v]
    return [np.concatenate(xs, axis=0)]


def _split_qkv(xs, cfg):
    return np.split(xs[0], [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=0)


def _stack(xs, cfg):  # E x (...) -> (E, ...)
    return [np.stack(xs)]


def _unstack(xs, cfg):
    return list(xs[0])


def _stack_gate_up(xs, cfg):  # gate_0..gate_{E-1}, up_0..up_{E-1}, each (F, C) -> (E, 2F, C)
    E = cfg.n_experts
    return [np.stack([np.concatenate([g, u], axis=0) for g, u in zip(xs[:E], xs[E:])])]


def _unstack_gate_up(xs, cfg):
    F = cfg.d_ff
    return [x[:F] for x in xs[0]] + [x[F:] for x in xs[0]]


FUSE_QKV = Transform("fuse_qkv", _fuse_qkv, _split_qkv)  # our q, k, v -> one [q | k | v]
SPLIT_QKV = invert(FUSE_QKV, "split_qkv")  # our [q | k | v] -> q, k, v
STACK_EXPERTS = Transform("stack_experts", _stack, _unstack)  # our E experts -> (E, ...)
STACK_GATE_UP = Transform("stack_gate_up", _stack_gate_up, _unstack_gate_up)  # -> (E, [gate | up], C)

# Our q, k, v names, fused or separate, for tables whose format has the other layout.
QKV_WEIGHTS = ("blocks.{}.attn.q_proj.weight", "blocks.{}.attn.k_proj.weight", "blocks.{}.attn.v_proj.weight")
QKV_BIASES = ("blocks.{}.attn.q_proj.bias", "blocks.{}.attn.k_proj.bias", "blocks.{}.attn.v_proj.bias")


class KeyMap(NamedTuple):
    name: str  # for messages: "HF Llama"
    rules: dict  # our name(s) -> foreign name(s) | (foreign name(s), Transform)
    ignored: tuple[str, ...] = ()  # foreign keys dropped on import


class _Rule(NamedTuple):
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: Transform


def _expand(keymap: KeyMap, cfg: ModelConfig) -> list[_Rule]:
    """Concrete rules for `cfg`: templates filled with every layer (and expert) index."""
    out = []
    for ours, value in keymap.rules.items():
        theirs, transform = value if isinstance(value[-1], Transform) else (value, IDENTITY)
        ours = (ours,) if isinstance(ours, str) else ours
        theirs = (theirs,) if isinstance(theirs, str) else theirs
        ranges = [range(cfg.n_layers), range(cfg.n_experts)][:ours[0].count("{}")]
        n_shared = theirs[0].count("{}")  # the rest of our indices are stacked
        for index in product(*ranges[:n_shared]):
            stacked = list(product(*ranges[n_shared:]))
            out.append(_Rule(tuple(t.format(*index, *j) for t in ours for j in stacked),
                             tuple(t.format(*index) for t in theirs), transform))
    return out


def _plan(keymap: KeyMap, cfg: ModelConfig, ours: set[str], theirs: set[str] | None = None) -> list[_Rule]:
    """The rules whose our names `cfg` has (and, importing, whose foreign names are present),
    in our canonical order."""
    order = {name: i for i, name in enumerate(state_shapes(cfg))}
    rules = [r for r in _expand(keymap, cfg) if all(n in ours for n in r.ours)]
    if theirs is not None:  # importing: of alternative layouts, the one on disk comes first
        rules.sort(key=lambda r: not all(n in theirs for n in r.theirs))
    chosen, covered = [], set()
    for rule in rules:  # the first rule for a weight wins (exporting: the table's order)
        if covered.isdisjoint(rule.ours):
            chosen.append(rule)
            covered.update(rule.ours)
    return sorted(chosen, key=lambda r: order.get(r.ours[0], len(order)))


def to_foreign(tensors: Mapping[str, np.ndarray], keymap: KeyMap, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our weights -> (foreign name, array) pairs, one rule at a time. Checks
    first that every weight has a place in the format."""
    plan = _plan(keymap, cfg, set(tensors))
    covered = {n for r in plan for n in r.ours}
    for name in tensors:
        if name not in covered:
            raise FormatError(f"weight {name!r} has no counterpart in {keymap.name}")

    def pairs():
        for rule in plan:
            yield from zip(rule.theirs, rule.transform.forward([tensors[n] for n in rule.ours], cfg))

    return pairs()


def from_foreign(foreign: Mapping[str, np.ndarray], keymap: KeyMap, cfg: ModelConfig,
                 where: str) -> Mapping[str, np.ndarray]:
    """Foreign weights -> a lazy mapping of ours (a foreign tensor is read when
    one of ours needs it). Missing and unexpected foreign keys raise here;
    shapes are checked as each tensor is produced."""
    expected = state_shapes(cfg)
    plan = _plan(keymap, cfg, set(expected), set(foreign))
    for rule in plan:
        for name in rule.theirs:
            if name not in foreign:
                raise FormatError(f"{where}: missing weight {name!r} ({keymap.name})")
    covered = {n for r in plan for n in r.ours}
    for name in expected:
        if name not in covered:
            raise FormatError(f"{where}: {keymap.name} has no weight for our {name!r}")
    used = {n for r in plan for n in r.theirs}
    ignored = re.compile("|".join(re.escape(p).replace(r"\{\}", r"\d+") for p in keymap.ignored) or "$^")
    unexpected = [n for n in foreign if n not in used and not ignored.fullmatch(n)]
    if unexpected:
        raise FormatError(f"{where}: unexpected weight {unexpected[0]!r} for {keymap.name}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return _Imported(plan, foreign, cfg, expected, where)


class _Imported(Mapping):
    """Our weights, computed on access from the foreign ones, in our canonical
    order. A rule's other outputs wait until they are read once, so a walk
    through the mapping reads each foreign tensor once and holds about one
    layer's tensors at a time."""

    def __init__(self, plan, foreign, cfg, expected, where):
        self._rule = {n: r for r in plan for n in r.ours}
        self._foreign, self._cfg, self._expected, self._where = foreign, cfg, expected, where
        self._pending: dict[str, np.ndarray] = {}

    def __getitem__(self, name):
        if name not in self._pending:
            rule = self._rule[name]
            arrays = rule.transform.inverse([self._foreign[n] for n in rule.theirs], self._cfg)
            for ours, a in zip(rule.ours, arrays):
                if tuple(a.shape) != self._expected[ours]:
                    raise FormatError(f"{self._where}: weight {', '.join(rule.theirs)} gives {ours!r} "
                                      f"shape {tuple(a.shape)}, the config expects {self._expected[ours]}")
            self._pending.update(zip(rule.ours, arrays))
        return self._pending.pop(name)

    def __iter__(self):
        return iter(self._expected)

    def __len__(self):
        return len(self._expected)
