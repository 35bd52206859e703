"""Weight transfer between the twins, by rule, in numpy.

A jaxgpt parameter path maps to a torchgpt state_dict key by three rules:

1. path parts join with "." and a list index suffix becomes a part:
   ("blocks_3", "attn", "qkv_proj", "kernel") -> "blocks.3.attn.qkv_proj.weight";
2. a module whose parameters are stacked on a leading axis (`blocks` under
   scan_layers, `experts` under nn.vmap) is unstacked into one key per index:
   ("blocks", "mlp", "experts", "up", "kernel")[l, e] -> "blocks.{l}.mlp.experts.{e}.up.weight";
3. the leaf renames and transforms of `LEAF_RULES`, each with its inverse.

The reverse direction (torch -> jax) walks a template of the jax tree and
applies the same rules backwards, so it is derived, not written twice. Every
transform is exact: torch -> jax -> torch is bit-identical.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from gptcore.errors import UserError


class WeightsError(UserError):
    """Missing, unexpected or mis-shaped weights; the message names the key."""


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


# jax leaf name -> (torch leaf name, jax -> torch transform, torch -> jax transform)
LEAF_RULES: dict[str, tuple[str, Callable, Callable]] = {
    "kernel": ("weight", _transpose, _transpose),  # Dense (in, out) <-> Linear (out, in)
    "embedding": ("weight", _identity, _identity),
    "scale": ("weight", _identity, _identity),  # LayerNorm / RMSNorm gain
    "bias": ("bias", _identity, _identity),
}
STACKED_MODULES = ("blocks", "experts")  # leading axis = layer / expert index


def _torch_part(part: str) -> str:
    head, _, index = part.rpartition("_")
    return f"{head}.{index}" if head and index.isdigit() else part


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
                name, to_torch, _ = LEAF_RULES.get(key, (key, _identity, _identity))
                out[".".join(prefix + [name])] = to_torch(np.asarray(value))

    walk(params, [])
    return out


def torch_to_jax(state: Mapping[str, np.ndarray], template: Mapping) -> dict:
    """Flat torch state (numpy) -> nested jax params shaped like `template`
    (a tree whose leaves have `.shape`, e.g. from jax.eval_shape). Missing,
    unexpected and mis-shaped keys raise WeightsError naming them."""
    used: set[str] = set()

    def take(name: str, shape: tuple, from_torch: Callable) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"missing weight {name!r}")
        value = from_torch(np.asarray(state[name]))
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(f"weight {name!r} has shape {tuple(np.shape(state[name]))}, "
                               f"the model expects {_torch_shape(shape, from_torch)}")
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
                name, _, from_torch = LEAF_RULES.get(key, (key, _identity, _identity))
                out[key] = take(".".join(prefix + [name]), value.shape, from_torch)
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


def _torch_shape(jax_shape: tuple, from_torch: Callable) -> tuple:
    if from_torch is _transpose:
        return tuple(jax_shape[:-2]) + (jax_shape[-1], jax_shape[-2])
    return tuple(jax_shape)
