"""Weight transfer between the twins, by rule, in numpy.

A jaxgpt parameter path maps to a torchgpt state_dict key by three rules:

1. path parts join with "." and a list index suffix becomes a part:
   ("blocks_3", "attn", "qkv_proj", "kernel") -> "blocks.3.attn.qkv_proj.weight";
2. a module whose parameters are stacked on a leading axis (`blocks` under
   scan_layers, `experts` under nn.vmap) is unstacked into one key per index:
   ("blocks", "mlp", "experts", "up", "kernel")[l, e] -> "blocks.{l}.mlp.experts.{e}.up.weight";
3. the leaf renames and transforms of `LEAF_RULES`: gptcore.transforms'
   Transform, the vocabulary of the foreign formats' key maps too, with
   torch as "ours" (forward: torch -> jax, inverse: jax -> torch).

The reverse direction (torch -> jax) walks a template of the jax tree and
applies the same rules backwards, so it is derived, not written twice. Every
transform is exact: torch -> jax -> torch is bit-identical.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from gptcore.errors import UserError
from gptcore.transforms import IDENTITY, TRANSPOSE, Transform


class WeightsError(UserError):
    """Missing, unexpected or mis-shaped weights; the message names the key."""


# jax leaf name -> (torch leaf name, transform torch -> jax)
LEAF_RULES: dict[str, tuple[str, Transform]] = {
    "kernel": ("weight", TRANSPOSE),  # Dense (in, out) <-> Linear (out, in)
    "embedding": ("weight", IDENTITY),
    "scale": ("weight", IDENTITY),  # LayerNorm / RMSNorm gain
    "bias": ("bias", IDENTITY),
}
STACKED_MODULES = ("blocks", "experts")  # leading axis = layer / expert index
LISTED = re.compile(r"(blocks)_(\d+)")  # Flax names layer i blocks_i; torch's ModuleList, blocks.i


def _torch_part(part: str) -> str:
    listed = LISTED.fullmatch(part)
    return f"{listed[1]}.{listed[2]}" if listed else part


def _to_torch(transform: Transform, a: np.ndarray) -> np.ndarray:
    return transform.inverse([a], None)[0]


def _from_torch(transform: Transform, a: np.ndarray) -> np.ndarray:
    return transform.forward([a], None)[0]


def jax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Nested jax params (arrays) -> flat {torch state_dict key: np.ndarray}."""
    out: dict[str, np.ndarray] = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                if key in STACKED_MODULES:
                    n = _leading_dim(value)
                    for i in range(n):
                        walk(_index(value, i), prefix + [key, str(i)])
                else:
                    walk(value, prefix + [_torch_part(key)])
            else:
                name, transform = LEAF_RULES.get(key, (key, IDENTITY))
                out[".".join(prefix + [name])] = _to_torch(transform, np.asarray(value))

    walk(params, [])
    return out


def torch_to_jax(state: Mapping[str, np.ndarray], template: Mapping) -> dict:
    """Flat torch state (numpy) -> nested jax params shaped like `template`
    (a tree whose leaves have `.shape`, e.g. from jax.eval_shape). Missing,
    unexpected and mis-shaped keys raise WeightsError naming them."""
    used: set[str] = set()

    def take(name: str, shape: tuple, transform: Transform) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"missing weight {name!r}")
        value = _from_torch(transform, np.asarray(state[name]))
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(f"weight {name!r} has shape {tuple(np.shape(state[name]))}, "
                               f"the model expects {_torch_shape(shape, transform)}")
        used.add(name)
        return value

    def walk(tree, prefix):
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                if key in STACKED_MODULES:
                    n = _leading_dim(value)
                    out[key] = _stack([walk(_index(value, i), prefix + [key, str(i)]) for i in range(n)])
                else:
                    out[key] = walk(value, prefix + [_torch_part(key)])
            else:
                name, transform = LEAF_RULES.get(key, (key, IDENTITY))
                out[key] = take(".".join(prefix + [name]), value.shape, transform)
        return out

    params = walk(_shapes(template), [])
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise WeightsError(f"unexpected weight {unexpected[0]!r}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return params


class _Shape:
    """A template leaf: only its shape matters."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _shapes(tree):
    if isinstance(tree, Mapping):
        return {k: _shapes(v) for k, v in tree.items()}
    return _Shape(tree.shape)


def _leading_dim(tree) -> int:
    leaf = tree
    while isinstance(leaf, Mapping):
        leaf = next(iter(leaf.values()))
    return leaf.shape[0]


def _index(tree, i):
    """Slice i of every leaf along the leading (layer / expert) axis."""
    if isinstance(tree, Mapping):
        return {k: _index(v, i) for k, v in tree.items()}
    if isinstance(tree, _Shape):
        return _Shape(tree.shape[1:])
    return np.asarray(tree)[i]


def _stack(parts: list):
    if isinstance(parts[0], Mapping):
        return {k: _stack([p[k] for p in parts]) for k in parts[0]}
    return np.stack(parts)


def _torch_shape(jax_shape: tuple, transform: Transform) -> tuple:
    if transform is TRANSPOSE:
        return tuple(jax_shape[:-2]) + (jax_shape[-1], jax_shape[-2])
    return tuple(jax_shape)
