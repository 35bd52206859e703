"""Where a jaxgpt train step runs: one device, pmap, or a (data, fsdp) mesh.

Every runner follows the `Runner` protocol, so jaxgpt.engine drives them alike:

- SingleDevice: the jitted step on the default device.
- PmapRunner: classic data parallelism. The state is replicated on every
  local device, each device takes a slice of every micro-batch, and
  `step_fn(..., axis_name="data")` sums gradients, nll and token counts
  over devices before one identical update everywhere.
- MeshRunner: one `jit` over a Mesh with axes ("data", "fsdp"). The batch
  is split over both axes. With fsdp 1 (plain data parallelism, the CPU
  default) the step is `step_fn(..., axis_name=AXES)` under shard_map, like
  pmap: one float32 all-reduce carries every gradient (step.psum_flat),
  where XLA's own partitioning meets the other devices once per parameter.
  With fsdp > 1 params and optimizer state are split FSDP-style over "fsdp"
  along their largest axis that "fsdp" divides (replicated otherwise), and
  XLA inserts the all-gathers and reduce-scatters into the single-device
  step_fn: the same function.

Multi-host: after jax.distributed.initialize the mesh spans every process's
devices and each process feeds only its rows of the global batch
(jax.make_array_from_process_local_data).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptcore.run import RunError
from gptcore.train_config import TrainConfig
from jaxgpt import step
from jaxgpt.step import Batch, TrainState, step_fn

AXES = ("data", "fsdp")


class Runner(Protocol):
    n_devices: int

    def describe(self) -> str:
        """The devices and the kind of parallelism, one line."""

    def place_state(self, state: TrainState) -> TrainState:
        """The (host) state on the runner's devices, in the layout `step` takes."""

    def place_batch(self, batch) -> Batch:
        """A global batch (x, y, valid numpy (A, B, T)) on the devices."""

    def step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]: ...

    def eval_params(self, state: TrainState):
        """The params as eval_loss takes them."""

    def checkpoint_state(self, state: TrainState) -> TrainState:
        """The state as Checkpoints.save takes it (one copy, not one per device)."""

    def metrics(self, metrics: dict) -> dict[str, float]: ...


class _OneCopy:
    """A runner whose state is one copy (sharded or not), as the step returns it."""

    def eval_params(self, state: TrainState):
        return state.params

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return state

    def metrics(self, metrics: dict) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items()}


class SingleDevice(_OneCopy):
    """The jitted step on the default device."""
    n_devices = 1

    def describe(self) -> str:
        return f"1 {jax.devices()[0].platform.upper()} device"

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state)

    def place_batch(self, batch) -> Batch:
        return tuple(jnp.asarray(a) for a in batch)

    def step(self, state: TrainState, batch: Batch, rng: jax.Array):
        return step.train_step(state, batch, rng)


class PmapRunner:
    """Data parallelism over the local devices with jax.pmap."""

    def __init__(self, devices=None):
        self.devices = devices or jax.local_devices()
        self.n_devices = len(self.devices)
        self._step = jax.pmap(functools.partial(step_fn, axis_name="data"), axis_name="data",
                              devices=self.devices, in_axes=(0, 0, None), donate_argnums=0)

    def describe(self) -> str:
        return f"{self.n_devices} {self.devices[0].platform.upper()} devices, pmap data parallel"

    def place_state(self, state: TrainState) -> TrainState:
        """One copy per device on a leading axis (pmap distributes it on the first step)."""
        n = self.n_devices
        return jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))),
                                      jax.device_get(state))

    def place_batch(self, batch) -> Batch:
        """(A, B, T) -> (n_devices, A, B / n_devices, T): device d takes rows d*B/n.. of every micro-batch."""
        def split(a):
            A, B = a.shape[:2]
            return np.swapaxes(a.reshape(A, self.n_devices, B // self.n_devices, *a.shape[2:]), 0, 1)
        return tuple(split(_check_rows(np.asarray(a), self.n_devices)) for a in batch)

    def step(self, state: TrainState, batch: Batch, rng: jax.Array):
        return self._step(state, batch, rng)

    def eval_params(self, state: TrainState):
        return jax.tree_util.tree_map(lambda a: a[0], state.params)

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return jax.tree_util.tree_map(lambda a: a[0], state)

    def metrics(self, metrics: dict) -> dict[str, float]:
        return {k: float(v[0]) for k, v in metrics.items()}


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis that `fsdp` divides (ties: the first); replicate
    scalars and arrays with no such axis."""
    if fsdp == 1 or not shape:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    axis = -max(candidates)[1]
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all (global) devices, data = n_devices / fsdp."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    if devices.size % fsdp:
        raise RunError(f"train.fsdp = {fsdp} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), AXES)


class MeshRunner(_OneCopy):
    """jit over a ("data", "fsdp") mesh: data parallel and FSDP in one program."""

    def __init__(self, fsdp: int = 1, devices=None):
        self.mesh = make_mesh(fsdp, devices)
        self.fsdp = fsdp
        self.n_devices = self.mesh.devices.size
        self.batch_sharding = NamedSharding(self.mesh, P(None, AXES, None))  # (A, B, T): B over every device
        self.replicated = NamedSharding(self.mesh, P())
        self._step = None

    def describe(self) -> str:
        data, fsdp = self.mesh.devices.shape
        return (f"{self.n_devices} {self.mesh.devices.flat[0].platform.upper()} devices, mesh data {data}"
                + (f" x fsdp {fsdp}" if fsdp > 1 else " (data parallel)"))

    def state_sharding(self, state: TrainState) -> TrainState:
        return jax.tree_util.tree_map(lambda a: NamedSharding(self.mesh, fsdp_spec(a.shape, self.fsdp)), state)

    def place_state(self, state: TrainState) -> TrainState:
        sharding = self.state_sharding(state)
        if self.fsdp == 1:  # plain data parallelism: each device runs step_fn on its rows
            # check_vma=False: with it on, JAX psums the gradients of replicated params itself and
            # step_fn's own psum would count them twice (tests compare grad norms with one device)
            local_step = jax.shard_map(functools.partial(step_fn, axis_name=AXES), mesh=self.mesh,
                                       in_specs=(P(), P(None, AXES, None), P()), out_specs=(P(), P()),
                                       check_vma=False)
            self._step = jax.jit(local_step, donate_argnums=0)
        else:
            self._step = jax.jit(step_fn, in_shardings=(sharding, self.batch_sharding, self.replicated),
                                 out_shardings=(sharding, self.replicated), donate_argnums=0)
        if jax.process_count() == 1:
            return jax.device_put(state, sharding)
        # every process holds the whole (host) state; each keeps its shards
        return jax.tree_util.tree_map(
            lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a)[idx]),
            state, sharding)

    def place_batch(self, batch) -> Batch:
        """Each process passes only the rows its devices hold."""
        if jax.process_count() == 1:
            return tuple(jax.device_put(tuple(_check_rows(np.asarray(a), self.n_devices) for a in batch),
                                        self.batch_sharding))
        arrays = []
        for a in batch:
            a = _check_rows(np.asarray(a), self.n_devices)
            rows = sorted({idx[1].indices(a.shape[1])[:2] for idx in
                           self.batch_sharding.addressable_devices_indices_map(a.shape).values()})
            local = np.concatenate([a[:, start:stop] for start, stop in rows], axis=1)
            arrays.append(jax.make_array_from_process_local_data(self.batch_sharding, local, a.shape))
        return tuple(arrays)

    def step(self, state: TrainState, batch: Batch, rng: jax.Array):
        return self._step(state, batch, jax.device_put(rng, self.replicated))


def _check_rows(a: np.ndarray, n_devices: int) -> np.ndarray:
    if a.shape[1] % n_devices:
        raise RunError(f"train.batch_size {a.shape[1]} is not divisible by the {n_devices} devices")
    return a


def gather(tree):
    """A (possibly multi-host sharded) pytree as host numpy arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def make_runner(cfg: TrainConfig) -> Runner:
    """The runner train.parallel asks for; "auto" is a data-parallel (and,
    with train.fsdp, parameter-sharded) mesh over every device when there are
    several, else the single device."""
    devices = jax.devices()
    if cfg.cpu_devices and devices[0].platform == "cpu" and jax.process_count() == 1:
        devices = devices[:cfg.cpu_devices]  # as asked, also where JAX was started with more (a live process)
    if cfg.parallel == "single" or (cfg.parallel == "auto" and len(devices) == 1):
        return SingleDevice()
    n = min(len(devices), jax.local_device_count()) if cfg.parallel == "pmap" else len(devices)
    if cfg.batch_size % n:
        raise RunError(f"train.batch_size {cfg.batch_size} is not divisible by the {n} devices "
                       f"(on a CPU host: set train.cpu_devices to a divisor of it)")
    return PmapRunner(devices[:n]) if cfg.parallel == "pmap" else MeshRunner(cfg.fsdp, devices)


def cpu_device_count(cfg: TrainConfig, cores: int | None = None) -> int:
    """train.cpu_devices, or for 0 the most devices, at most one per core,
    that divide train.batch_size."""
    if cfg.cpu_devices:
        return cfg.cpu_devices
    cores = cores or len(os.sched_getaffinity(0))
    return max(n for n in range(1, cores + 1) if cfg.batch_size % n == 0)


def split_cpu(cfg: TrainConfig) -> None:
    """Split a CPU host into cpu_device_count(cfg) XLA devices, so that
    parallel = "auto" trains data parallel with every core busy.

    Why: XLA's CPU runtime runs the ops of a small model's step one after
    another, most of them on one thread, so one device leaves the other
    cores mostly idle (torch spreads each op over its intra-op threads
    instead). Devices are set before JAX starts; an explicit
    --xla_force_host_platform_device_count in XLA_FLAGS wins, and once JAX
    has started (jaxgpt.train.main called in a live process) the count
    stays, but make_runner still trains on the first train.cpu_devices of
    them when that is set. Other backends (GPU, TPU) are untouched.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", cpu_device_count(cfg))
    except RuntimeError:  # the backends are already up
        pass
