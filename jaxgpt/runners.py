"""Where a jaxgpt train step runs: one device, pmap, or a (data, fsdp, expert, tensor) mesh.

Every runner follows the `Runner` protocol, so jaxgpt.engine drives them alike:

- SingleDevice: the jitted step on the default device.
- PmapRunner: classic data parallelism. The state is replicated on every
  local device, each device takes a slice of every micro-batch, and
  `step_fn(..., axis_name="data")` sums gradients, nll and token counts
  over devices before one identical update everywhere.
- MeshRunner: one `jit` over a Mesh with axes ("data", "fsdp", "expert", "tensor")
  (jaxgpt.sharding: the axes, the logical axis rules). The batch is split
  over data, fsdp and expert. With fsdp = expert = tensor = 1 (plain data parallelism, the
  CPU default) the step is `step_fn(..., axis_name=...)` under shard_map,
  like pmap: one float32 all-reduce carries every gradient
  (step.psum_flat), where XLA's own partitioning meets the other devices
  once per parameter. Otherwise params and optimizer state are sharded as
  jaxgpt.sharding's rules say, and XLA inserts the collectives into the
  single-device step_fn: the same function. The state is created sharded
  (`init_state`: a jitted init with output shardings) and checkpoints
  restore straight into the shardings, so no process holds a full copy.

Multi-host: after jax.distributed.initialize the mesh spans every process's
devices and each process reads and feeds only its rows of the global batch
(local_rows, jax.make_array_from_process_local_data).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptcore.config import ModelConfig
from gptcore.run import RunError
from gptcore.train_config import TrainConfig
from jaxgpt import step
from jaxgpt.sharding import Layout, activation_layout, make_mesh
from jaxgpt.step import Batch, TrainState, step_fn

DATA_AXES = ("data", "fsdp", "expert")  # the batch axes; shard_map's axis names in the data-parallel case


class Runner(Protocol):
    n_devices: int

    def describe(self) -> str:
        """The devices and the kind of parallelism, one line."""

    def init_state(self, init: Callable[[], TrainState]) -> TrainState:
        """The state `init` (a traceable function) creates, on the runner's devices."""

    def place_state(self, state: TrainState) -> TrainState:
        """A (host) state on the runner's devices, in the layout `step` takes;
        arrays already placed there stay."""

    def local_rows(self, batch_size: int) -> np.ndarray | None:
        """The rows of each micro-batch this process feeds (None: all of them)."""

    def place_batch(self, batch) -> Batch:
        """A batch (x, y, valid numpy (A, B, T); B: this process's local_rows) on the devices."""

    def step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]: ...

    def eval_params(self, state: TrainState):
        """The params as one copy (exports, samples, parameter counts)."""

    def evaluate(self, state: TrainState, batches) -> float:
        """Mean loss of the state's params over evaluation batches (x, y (B, T) numpy each)."""

    def checkpoint_state(self, state: TrainState) -> TrainState:
        """The state as Checkpoints.save takes it (one copy, not one per device)."""

    def metrics(self, metrics: dict) -> dict[str, float]: ...


class _OneCopy:
    """A runner whose state is one copy (sharded or not), as the step returns it."""

    def local_rows(self, batch_size: int) -> np.ndarray | None:
        return None  # one process feeds every row

    def eval_params(self, state: TrainState):
        return state.params

    def evaluate(self, state: TrainState, batches) -> float:
        params = self.eval_params(state)
        return step.evaluate(lambda x, y: step.eval_loss(params, state.model, jnp.asarray(x), jnp.asarray(y),
                                                         state.loss_chunk), batches)

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return state

    def metrics(self, metrics: dict) -> dict[str, float | list[float]]:
        return {k: np.asarray(v).tolist() for k, v in metrics.items()}  # a float, or a list (expert_load)


class SingleDevice(_OneCopy):
    """The jitted step on the default device."""
    n_devices = 1

    def describe(self) -> str:
        return f"1 {jax.devices()[0].platform.upper()} device"

    def init_state(self, init: Callable[[], TrainState]) -> TrainState:
        return jax.jit(init)()

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

    def init_state(self, init: Callable[[], TrainState]) -> TrainState:
        return self.place_state(jax.jit(init)())

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

    def local_rows(self, batch_size: int) -> np.ndarray | None:
        return None  # the local devices: every row

    def eval_params(self, state: TrainState):
        return jax.tree_util.tree_map(lambda a: a[0], state.params)

    evaluate = _OneCopy.evaluate  # on the first device, as one copy

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return jax.tree_util.tree_map(lambda a: a[0], state)

    def metrics(self, metrics: dict) -> dict[str, float | list[float]]:
        return {k: np.asarray(v[0]).tolist() for k, v in metrics.items()}


class MeshRunner(_OneCopy):
    """jit over a ("data", "fsdp", "expert", "tensor") mesh: data parallel,
    FSDP, expert and tensor parallel in one program."""

    def __init__(self, cfg: ModelConfig, fsdp: int = 1, tensor: int = 1, devices=None, expert: int = 1):
        self.layout = Layout(make_mesh(fsdp, tensor, expert, devices), cfg)
        self.mesh = self.layout.mesh
        self.n_devices = self.mesh.devices.size
        self.batch_sharding = self.layout.batch_sharding()
        self.row_sharding = NamedSharding(self.mesh, P(*self.batch_sharding.spec[1:]))  # (B, T) eval batches
        self.replicated = NamedSharding(self.mesh, P())
        self.data_parallel = fsdp == tensor == expert == 1
        self._step = self._eval = None

    def describe(self) -> str:
        sizes = self.layout.sizes
        split = " x ".join(f"{axis} {n}" for axis, n in sizes.items() if n > 1 and axis != "data")
        return (f"{self.n_devices} {self.mesh.devices.flat[0].platform.upper()} devices, mesh data {sizes['data']}"
                + (f" x {split}" if split else " (data parallel)"))

    def state_sharding(self, state: TrainState) -> TrainState:
        return self.layout.state_shardings(state)

    def init_state(self, init: Callable[[], TrainState]) -> TrainState:
        """Sharded from birth: each device computes only its shards (JAX's
        partitionable threefry draws the same numbers as an unsharded init)."""
        return jax.jit(init, out_shardings=self.state_sharding(jax.eval_shape(init)))()

    def place_state(self, state: TrainState) -> TrainState:
        sharding = self.state_sharding(state)

        def place(a, s):
            if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(s, a.ndim):
                return a  # already there (a sharded init or restore)
            if jax.process_count() == 1:
                return jax.device_put(a, s)
            return jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a[idx]))
        return jax.tree_util.tree_map(place, state, sharding)

    def compile_step(self, state: TrainState):
        """The jitted step for states shaped like `state` (arrays or ShapeDtypeStructs: jaxgpt.plan)."""
        if self.data_parallel:  # each device runs step_fn on its rows
            # check_vma=False: with it on, JAX psums the gradients of replicated params itself and
            # step_fn's own psum would count them twice (tests compare grad norms with one device)
            local_step = jax.shard_map(functools.partial(step_fn, axis_name=DATA_AXES), mesh=self.mesh,
                                       in_specs=(P(), self.batch_sharding.spec, P()), out_specs=(P(), P()),
                                       check_vma=False)
            return jax.jit(local_step, donate_argnums=0)
        sharding = self.state_sharding(state)

        def sharded_step(state, batch, rng):  # traced with the activations laid out on the mesh
            with activation_layout(self.layout):
                return step_fn(state, batch, rng)
        return jax.jit(sharded_step, in_shardings=(sharding, self.batch_sharding, self.replicated),
                       out_shardings=(sharding, self.replicated), donate_argnums=0)

    def compile_eval(self, state: TrainState):
        """eval_fn jitted for params shaped like state's, in their shardings:
        the batch's rows split as the step's, the activations laid out as in
        the step (without that, XLA kept every row's activations on every
        device: 6x the temporaries for GPT-2 small on 8 devices)."""
        def laid_out(params, x, y):
            with activation_layout(self.layout):
                return step.eval_fn(params, state.model, x, y, state.loss_chunk)
        return jax.jit(laid_out, in_shardings=(self.state_sharding(state).params, self.row_sharding,
                                               self.row_sharding), out_shardings=self.replicated)

    def evaluate(self, state: TrainState, batches) -> float:
        """Every process passes the whole evaluation batch (they are small and the same on each)."""
        if self._eval is None:
            self._eval = self.compile_eval(state)

        def place(a: np.ndarray) -> jax.Array:
            a = _check_rows(np.asarray(a), self.layout.batch_devices, axis=0)
            if jax.process_count() == 1:
                return jax.device_put(a, self.row_sharding)
            return jax.make_array_from_callback(a.shape, self.row_sharding, lambda index: a[index])
        return step.evaluate(lambda x, y: self._eval(state.params, place(x), place(y)), batches)

    def local_rows(self, batch_size: int) -> np.ndarray | None:
        """Multi-host: the rows this process's devices hold, in order (each
        process reads only these from the data); one process: None, all."""
        if jax.process_count() == 1:
            return None
        index = self.batch_sharding.addressable_devices_indices_map((1, batch_size, 1)).values()
        spans = sorted({rows.indices(batch_size)[:2] for _, rows, _ in index})
        return np.concatenate([np.arange(start, stop) for start, stop in spans])

    def place_batch(self, batch) -> Batch:
        """Each process passes only the rows its devices hold (local_rows)."""
        rows = self.layout.batch_devices
        if jax.process_count() == 1:
            return tuple(jax.device_put(tuple(_check_rows(np.asarray(a), rows) for a in batch),
                                        self.batch_sharding))
        blocks = self.layout.batch_devices  # the batch's row blocks, of which this process holds len(mine)
        mine = self.local_rows(blocks)
        shape = (batch[0].shape[0], batch[0].shape[1] * blocks // len(mine), *batch[0].shape[2:])  # the global batch
        return tuple(jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(a), shape)
                     for a in batch)

    def step(self, state: TrainState, batch: Batch, rng: jax.Array):
        if self._step is None:
            self._step = self.compile_step(state)
        return self._step(state, batch, jax.device_put(rng, self.replicated))


def _check_rows(a: np.ndarray, n_devices: int, axis: int = 1) -> np.ndarray:
    if a.shape[axis] % n_devices:
        raise RunError(f"train.batch_size {a.shape[axis]} is not divisible by the {n_devices} devices")
    return a


def gather(tree, keep: bool = True):
    """A (possibly multi-host sharded) pytree as host numpy arrays. Across
    processes one leaf at a time, every process taking part: a process with
    keep=False holds at most one gathered leaf at once and gets None leaves."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    gathered = []
    for leaf in leaves:
        whole = multihost_utils.process_allgather(leaf, tiled=True)
        gathered.append(whole if keep else None)
        del whole
    return jax.tree_util.tree_unflatten(treedef, gathered)


def make_runner(cfg: TrainConfig, model: ModelConfig) -> Runner:
    """The runner train.parallel asks for; "auto" is a data-parallel (and,
    with train.fsdp / train.tensor, sharded) mesh over every device when there
    are several, else the single device."""
    devices = jax.devices()
    if cfg.cpu_devices and devices[0].platform == "cpu" and jax.process_count() == 1:
        devices = devices[:cfg.cpu_devices]  # as asked, also where JAX was started with more (a live process)
    if cfg.parallel == "single" or (cfg.parallel == "auto" and len(devices) == 1):
        return SingleDevice()
    n = min(len(devices), jax.local_device_count()) if cfg.parallel == "pmap" else len(devices)
    rows = n // cfg.tensor if cfg.parallel != "pmap" and n % cfg.tensor == 0 else n
    if cfg.batch_size % rows:
        raise RunError(f"train.batch_size {cfg.batch_size} is not divisible by the {rows} devices "
                       f"(on a CPU host: set train.cpu_devices to a divisor of it)")
    if cfg.parallel == "pmap":
        return PmapRunner(devices[:n])
    return MeshRunner(model, cfg.fsdp, cfg.tensor, devices, expert=cfg.expert)


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
