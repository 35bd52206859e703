"""Where every array of a jaxgpt run lives on a device mesh.

The mesh has four axes, outermost first:

    data    batch rows; everything else replicated
    fsdp    batch rows, and parameters and optimizer state split ZeRO-3
            style (XLA gathers a layer's weights where the step uses them)
    expert  batch rows, and a mixture of experts' experts: each device holds
            E / expert of them and computes them on every row routed to
            them (moe_impl "capacity": the per-sequence buffers move from
            rows-over-devices to experts-over-devices and back, all-to-alls
            XLA's partitioner inserts)
    tensor  Megatron-style: attention heads (q/k/v column-parallel, out-
            projection row-parallel), the MLP hidden dimension (up / gate
            column, down row) and the vocabulary of the embedding and head;
            innermost, so a tensor group is neighbouring devices (one host)

Each dimension of a parameter has a logical name, read from its place in
the model (`logical_axes`), and RULES, the one table of this module, maps
logical names to mesh axes. A dimension stays whole (replicated) when its
mesh axes do not divide it, or when they would split a unit of it: heads
and kv_heads shard only when the tensor axis divides their count, so GQA
with fewer KV heads than the tensor axis replicates the KV projections.
Activations are constrained the same way (`constrain`, called by the
model while a mesh step is traced): batch rows over data x fsdp, features
as the weights that produced them. Without these XLA's partitioner may keep
every token on every device and all-reduce matmul outputs instead.

The chunked loss is the one place that does not leave the layout to XLA:
it runs per device (`over_tokens`, under shard_map), each device slicing
its own tokens against the whole head.

None of this changes the function computed; XLA's partitioner inserts the
collectives (tested: every mesh equals one device, tests/test_parallel.py).
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptcore.config import ModelConfig
from gptcore.errors import RunError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (None: never split)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "expert_batch": ("data", "fsdp"),  # the rows of expert buffers, whose experts split over "expert"
    "embed": ("fsdp", "expert"),  # non-expert weights also split over "expert" (experts take it first)
    "vocab": ("tensor",),
    "heads": ("tensor",),  # the H*D output of q_proj, input of out_proj
    "kv_heads": ("tensor",),  # the K*D output of k_proj / v_proj
    "mlp": ("tensor",),  # the F hidden dimension of MLPs and experts
    "qkv": None,  # the fused [q | k | v] projection: a split would cut across q, k and v
    "experts": ("expert",),
    "layers": None,  # scan_layers' leading axis
    "length": None,  # learned position table rows
    "router": None,
    "norm": None,
    # activations: batch rows as the input, features as the weights that made them
    "act_embed": None,  # the residual stream stays whole on each device
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_experts": ("expert",),
    "loss_tokens": ("tensor",),  # a row's tokens in the chunked loss (over_tokens): tensor devices share them
}

# Dense layer name -> logical axes of its (fan_in, fan_out) kernel; its bias takes fan_out's
_DENSE = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "qkv_proj": ("embed", "qkv"), "out_proj": ("heads", "embed"),
    "up": ("embed", "mlp"), "gate": ("embed", "mlp"), "down": ("mlp", "embed"),
    "router": ("embed", "router"), "lm_head": ("embed", "vocab"),
}


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical name of each dimension of the parameter at `path` (its dict
    keys, e.g. ("blocks_0", "attn", "q_proj", "kernel")); optimizer moments
    share their parameter's path and names. Unknown leaves: all None."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "embedding":
        base = ("vocab", "embed") if module == "tok_emb" else ("length", "embed")
    elif leaf == "kernel" and module in _DENSE:
        base = _DENSE[module]
    elif leaf == "bias" and module in _DENSE:
        base = _DENSE[module][1:]
    elif leaf == "lm_head_bias":
        base = ("vocab",)
    else:  # norm scales and biases
        base = ("norm",)
    axes = ("layers",) * ("blocks" in path) + ("experts",) * ("experts" in path) + base
    return axes if len(axes) == ndim else (None,) * ndim


def make_mesh(fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all (global) devices; data
    takes what fsdp x expert x tensor leave."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size % (fsdp * expert * tensor):
        sizes = f"{fsdp} x {tensor}" if expert == 1 else f"{fsdp} x {tensor} x {expert}"
        names = "train.fsdp x train.tensor" + ("" if expert == 1 else " x train.expert")
        raise RunError(f"{names} = {sizes} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // (fsdp * expert * tensor), fsdp, expert, tensor), MESH_AXES)


class Layout:
    """The shardings of one model on one mesh."""

    def __init__(self, mesh: Mesh, cfg: ModelConfig):
        self.mesh = mesh
        self.sizes = dict(mesh.shape)  # axis name -> size (a Mesh, or an AbstractMesh for planning)
        # a logical axis made of units splits only between units
        self.units = {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "experts": cfg.n_experts or 1,
                      "act_heads": cfg.n_heads, "act_kv_heads": cfg.n_kv_heads, "act_experts": cfg.n_experts or 1}

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> P:
        """The PartitionSpec of an array whose dimensions have logical `axes`."""
        used: set[str] = set()
        out: list = []
        for name, size in zip(axes, shape):
            mesh_axes = tuple(a for a in (RULES.get(name) or ()) if self.sizes.get(a, 1) > 1 and a not in used)
            n = math.prod(self.sizes[a] for a in mesh_axes)
            if not mesh_axes or size % n or self.units.get(name, n) % n:
                out.append(None)
                continue
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def param_spec(self, path, shape) -> P:
        """The spec of a state leaf at a jax key path (params or an optimizer moment)."""
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return self.spec(logical_axes(keys, len(shape)), tuple(shape)) if keys and shape else P()

    def state_shardings(self, tree):
        """NamedShardings for every leaf of a state-like tree (arrays or ShapeDtypeStructs)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, a: NamedSharding(self.mesh, self.param_spec(path, np.shape(a))), tree)

    def batch_sharding(self) -> NamedSharding:
        """(A, B, T) step inputs: rows over the batch axes (data, fsdp, expert), replicated over tensor."""
        return NamedSharding(self.mesh, P(None, RULES["batch"], None))

    @property
    def batch_devices(self) -> int:
        """How many ways the batch rows are split."""
        return math.prod(self.sizes[a] for a in RULES["batch"])


_TRACING: list[Layout] = []  # the layout of the mesh step being traced, if any


@contextlib.contextmanager
def activation_layout(layout: Layout):
    """While a step is traced inside this, `constrain` lays activations out on layout's mesh."""
    _TRACING.append(layout)
    try:
        yield
    finally:
        _TRACING.pop()


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """x laid out as its logical `axes` say, when traced for a mesh step
    (activation_layout); x itself anywhere else (one device, pmap,
    shard_map's data parallelism, generation)."""
    if not _TRACING or len(axes) != x.ndim:
        return x
    layout = _TRACING[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, layout.spec(axes, x.shape)))


def over_tokens(fn, *tokens: jax.Array, whole: tuple = ()):
    """fn(*tokens, *whole), a sum over tokens (arrays whose leading dims
    are (B, T)), computed by each device of a mesh step being traced on its
    own tokens (rows as the batch's, a row's tokens over tensor) with
    `whole` replicated, the partial sums added once; fn itself anywhere
    else. The chunked loss runs so: under XLA's partitioner alone, its slice
    loop reduced each slice's logits across devices (or the head's gradient,
    once the head was whole)."""
    if not _TRACING:
        return fn(*tokens, *whole)
    layout = _TRACING[-1]
    spec = layout.spec(("batch", "loss_tokens"), tokens[0].shape[:2])
    split = tuple(a for part in spec if part for a in ((part,) if isinstance(part, str) else part))
    # the step's layout at the boundary (rows only): else the gradient of the tokens, split over tensor,
    # kept that layout back through every layer, which then gathered its activations
    rows = NamedSharding(layout.mesh, layout.spec(("batch",), tokens[0].shape[:1]))
    tokens = tuple(jax.lax.with_sharding_constraint(t, rows) for t in tokens)

    def local(*args):
        out = fn(*args)
        return jax.lax.psum(out, split) if split else out
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(spec,) * len(tokens) + (P(),) * len(whole),
                         out_specs=P())(*tokens, *whole)
