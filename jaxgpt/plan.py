"""Will a config fit a mesh? Find out before renting one:

    python -m jaxgpt.plan --config llama2_7b --devices 64 train.fsdp=16 train.tensor=4

lowers and compiles the real train step and evaluation (jaxgpt.runners.MeshRunner's,
the ones `python -m jaxgpt.train` runs) ahead of time for N simulated CPU
devices, from abstract shapes: nothing the size of the model is allocated.
It prints, per device: parameter and optimizer-state bytes (from the
shardings), XLA's temporary bytes (its buffer assignment, CPU backend: an
accelerator's compiler fuses and schedules differently, so read it as an
estimate), the matmul FLOPs of one step and the bytes the collectives
produce (at the width the SPMD partitioner gave them: XLA:CPU widens bf16
collectives to f32), read from the compiled program with while-loop bodies (scanned
layers, micro-batches) counted once per iteration; and the model's
parameter count. MaxText's ahead-of-time
compile is the model for this.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import time
from dataclasses import dataclass

from gptcore.budget import param_count
from gptcore.cli import Parser, guarded
from gptcore.config import ModelConfig
from gptcore.errors import UserError
from gptcore.presets import load_config
from gptcore.train_config import TrainConfig

GB = 2 ** 30


@dataclass(frozen=True)
class Plan:
    devices: int
    mesh: str  # "data 4 x fsdp 16": data and the axes of more than one device
    params: int  # the model's parameter count
    param_bytes: int  # per device, as sharded
    optimizer_bytes: int  # per device
    temp_bytes: int  # per device, XLA's buffer assignment
    eval_temp_bytes: int  # per device, the evaluation's (one (B, T) batch, forward only)
    flops: float  # per device, one optimizer step: matmuls (dot ops) of the compiled program
    collective_bytes: int  # per device, one optimizer step
    compile_s: float

    @property
    def analytic_state_bytes(self) -> float:
        """fp32 params and two fp32 AdamW moments, evenly split: (4 + 8) x params / devices."""
        return 12 * self.params / self.devices


def make_plan(mc: ModelConfig, tc: TrainConfig, devices: list) -> Plan:
    """Compile one train step of (mc, tc) for `devices` from abstract shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.runners import MeshRunner
    from jaxgpt.step import fresh_state, make_model

    if tc.kernels == "auto":  # what "auto" means on an accelerator, whatever runs the plan
        tc = tc.replace(kernels="reference")
    runner = MeshRunner(mc, tc.fsdp, tc.tensor, devices, expert=tc.expert)
    shapes = jax.eval_shape(functools.partial(fresh_state, make_model(mc, tc), mc, tc))
    shardings = runner.state_sharding(shapes)
    state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   shapes, shardings)
    A, B, T = tc.grad_accum, tc.batch_size, mc.context_length
    if B % runner.layout.batch_devices:
        raise UserError(f"train.batch_size {B} is not divisible by the {runner.layout.batch_devices} devices "
                        f"the batch is split over (data x fsdp x expert)")
    batch = tuple(jax.ShapeDtypeStruct((A, B, T), dtype, sharding=runner.batch_sharding)
                  for dtype in (jnp.int32, jnp.int32, jnp.bool_))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=runner.replicated)
    start = time.perf_counter()
    compiled = runner.compile_step(shapes).lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start

    def per_device(tree) -> int:
        return sum(math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                   for s in jax.tree_util.tree_leaves(tree))

    memory = compiled.memory_analysis()
    rows = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=runner.row_sharding)
    evaluation = runner.compile_eval(shapes).lower(state.params, rows, rows).compile().memory_analysis()
    flops, moved = hlo_counts(compiled.as_text())
    sizes = runner.layout.sizes
    mesh = " x ".join(f"{axis} {n}" for axis, n in sizes.items() if n > 1 or axis == "data")
    return Plan(devices=len(devices), mesh=mesh,
                params=param_count(mc), param_bytes=per_device(state.params),
                optimizer_bytes=per_device(state.opt_state), temp_bytes=int(memory.temp_size_in_bytes),
                eval_temp_bytes=int(evaluation.temp_size_in_bytes),
                flops=flops, collective_bytes=moved, compile_s=compile_s)


# -- what one run of the compiled HLO does ---------------------------------------------------------------
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_CALLEE = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_NARROW = ("bf16", "f16")  # what XLA:CPU has no collectives for: it widens them to f32 (float normalization)


def _arrays(type_text: str) -> list[tuple[str, list[int]]]:
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(type_text)]


def hlo_counts(hlo: str) -> tuple[float, int]:
    """(matmul FLOPs, collective result bytes) of one run of an HLO module
    (per device for an SPMD program). An op inside a while body counts once
    per iteration (XLA's known trip count; XLA's own cost analysis counts a
    loop body once), inside a called or fused computation once per call.
    An asynchronous collective counts at its -done. A collective counts at
    the width of what it moves: XLA:CPU, which compiles the plan, has no
    bf16 collectives and widens them to f32 (a convert from bf16 in front,
    one back behind), where an accelerator moves the bf16 values the
    partitioner gave it; such a collective counts at 2 bytes an element."""
    bodies: dict[str, list[str]] = {}
    types: dict[str, str] = {}  # instruction -> its result type (names are unique in a module)
    defs: dict[str, re.Match] = {}  # instruction -> its definition
    roots: dict[str, str] = {}  # computation -> its ROOT instruction
    entry = name = None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(2)
            bodies[name] = []
            entry = name if header.group(1) else entry
        elif name is not None and (m := _DEFINITION.match(line)):
            bodies[name].append(line)
            types[m.group(1)] = m.group(2)
            defs[m.group(1)] = m
            if line.lstrip().startswith("ROOT "):
                roots[name] = m.group(1)

    def operands(m: re.Match) -> list[str]:
        return _OPERANDS.findall(m.group(4).split(")", 1)[0])

    def widened(value: str) -> bool:
        """value is a convert of a bf16 / f16 array, alone or as a fusion's root."""
        m = defs.get(value)
        if m and m.group(3) == "fusion" and (callee := re.search(r"calls=%([\w.\-]+)", m.group(0))):
            m = defs.get(roots.get(callee.group(1), ""))
        if not m or m.group(3) != "convert" or not (args := operands(m)):
            return False
        return any(dtype in _NARROW for dtype, _ in _arrays(types.get(args[0], "")))

    def moved(m: re.Match) -> int:
        args = operands(m)
        if m.group(3).endswith("-done") and args and args[0] in defs:  # the -start holds the operands
            args = operands(defs[args[0]])
        arrays = _arrays(m.group(2))
        paired = len(args) == len(arrays)
        return sum((2 if dtype == "f32" and paired and widened(arg) else _ITEM_BYTES.get(dtype, 4)) * math.prod(dims)
                   for (dtype, dims), arg in zip(arrays, args if paired else [""] * len(arrays)))

    def own(line: str) -> tuple[float, int]:
        m = _DEFINITION.match(line)
        result, op, rest = m.group(2), m.group(3), m.group(4)
        if op == "dot":
            lhs = re.match(r"\s*%([\w.\-]+)", rest)
            dims = _arrays(types.get(lhs.group(1), "")) if lhs else []
            contracting = _LHS_CONTRACTING.search(line)
            if dims and contracting:
                k = math.prod(dims[0][1][int(d)] for d in contracting.group(1).split(",") if d)
                return 2.0 * math.prod(_arrays(result)[0][1]) * k, 0
        if op.removesuffix("-done") in _COLLECTIVES:
            return 0.0, moved(m)
        return 0.0, 0

    @functools.lru_cache(maxsize=None)
    def total(comp: str) -> tuple[float, int]:
        flops, moved = 0.0, 0
        for line in bodies.get(comp, ()):
            f, b = own(line)
            callees = [(kind, c) for kind, c in _CALLEE.findall(line)]
            for group in _BRANCHES.findall(line):
                callees += [("branch", c.strip().lstrip("%")) for c in group.split(",")]
            trips = int(t.group(1)) if (t := _TRIP.search(line)) else 1
            for kind, callee in callees:
                if callee in bodies and callee != comp:
                    times = trips if kind == "body" else 1
                    cf, cb = total(callee)
                    f, b = f + times * cf, b + times * cb
            flops, moved = flops + f, moved + b
        return flops, moved

    return total(entry) if entry else (0.0, 0)


# -- the command line --------------------------------------------------------------------------------------
def report(plan: Plan) -> str:
    state = plan.param_bytes + plan.optimizer_bytes
    rows = [("mesh", f"{plan.mesh} ({plan.devices} devices)"),
            ("parameters", f"{plan.params:,}"),
            ("per device: params", _gb(plan.param_bytes)),
            ("per device: optimizer state", _gb(plan.optimizer_bytes)),
            ("per device: params + optimizer", f"{_gb(state)} (analytic (4 + 8) x params / devices: "
                                               f"{_gb(plan.analytic_state_bytes)}, "
                                               f"{state / plan.analytic_state_bytes:.3f}x)"),
            ("per device: temporaries (XLA)", _gb(plan.temp_bytes)),
            ("per device: total", _gb(state + plan.temp_bytes)),
            ("per device: evaluation temporaries", _gb(plan.eval_temp_bytes)),
            ("per device: matmul FLOPs / step", f"{plan.flops:.3e}"),
            ("per device: collectives / step", _gb(plan.collective_bytes)),
            ("compile time", f"{plan.compile_s:.1f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gb(n: float) -> str:
    return f"{n / GB:,.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jaxgpt.plan",
                    description="Compile a config's train step ahead of time for N simulated devices and "
                                "report per-device memory, FLOPs and collective traffic.")
    parser.add_argument("--config", required=True, help="preset name or TOML path")
    parser.add_argument("--devices", type=int, required=True, help="devices of the mesh (simulated on the CPU)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (train.fsdp=.., train.tensor=..)")
    args = parser.parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args: argparse.Namespace) -> None:
    if not 1 <= args.devices <= 4096:
        raise UserError(f"--devices must be in [1, 4096], got {args.devices}")
    config = load_config(args.config, args.overrides)
    mc, tc = config["model"], config["train"]
    import jax
    try:  # simulated devices on the CPU, whatever accelerator this host has
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:
        pass  # JAX already started (in a live process): plan on the devices it has
    devices = jax.devices()
    if len(devices) < args.devices:
        raise UserError(f"JAX already runs with {len(devices)} devices; run the plan in a new process")
    print(report(make_plan(mc, tc, devices[:args.devices])))


if __name__ == "__main__":
    sys.exit(main())
