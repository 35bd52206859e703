"""Training in JAX: `python -m jaxgpt.train --config PRESET key=value ... [--resume]`.

Parallel text: torchgpt/train.py (same config, schedule, decay mask, clipping
formula, gradient accumulation and batches). One optimizer step:

    grads = sum over A micro-batches of d/dparams [ sum_valid nll / N_valid_total + coef * aux / A ]
    grads = grads * min(1, clip / (|grads| + 1e-6))          # torch's clip_grad_norm_
    params = AdamW(lr_at(step), betas, eps, weight_decay on matrices only)(grads)

The whole mutable state of a run is one pytree (`TrainState`: step, params,
opt_state); batches and dropout keys are pure functions of (seed, step), so
a checkpoint of the state is all a run needs to continue bit-identically.

Shape legend: A micro-batches per step, B batch, T block size, V vocab.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.flatten_util import ravel_pytree

from gptcore import training
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig
from jaxgpt import ops
from jaxgpt.checkpoint import CheckpointError, load_model, save_model
from jaxgpt.model import GPT, count_params, init_params, stack_layers, unstack_layers

Batch = tuple[jax.Array, jax.Array, jax.Array]  # x, y int32 and valid bool, each (A, B, T)


# -- optimizer ----------------------------------------------------------------------
def decay_mask(params, decay: str = "matrices"):
    """True where weight decay applies. "matrices" is nanoGPT's rule (every
    tensor with ndim >= 2 in the torch layout): Dense kernels and embeddings
    decay; biases, norm gains and the lm_head bias do not. Named by leaf, not
    by ndim, because stacked layers (scan) and experts (vmap) add an axis."""
    def leaf_decays(path, _):
        return decay == "all" or (decay == "matrices" and path[-1].key in ("kernel", "embedding"))
    return jax.tree_util.tree_map_with_path(leaf_decays, params)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: grads * min(1, max_norm / (norm + 1e-6)).
    (optax.clip_by_global_norm has no epsilon and skips the multiply when
    norm <= max_norm.)"""
    def update_fn(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """gptcore.train_config.lr_at as a traceable function of the update count
    (optax passes 0 to the first update, as lr_at expects)."""
    return _schedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps)


@functools.lru_cache  # equal hyperparameters share one schedule and optimizer, hence one compiled step
def _schedule(lr: float, min_lr: float, warmup: int, decay_steps: int) -> optax.Schedule:
    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = lr * (step + 1.0) / (warmup + 1.0)
        ratio = jnp.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(step < warmup, warm, jnp.where(step >= decay_steps, min_lr, cosine))
    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW with every hyperparameter explicit (optax's
    weight_decay default is 1e-4, torch's 1e-2)."""
    return _optimizer(lr_schedule(cfg), cfg.beta1, cfg.beta2, cfg.adam_eps, cfg.weight_decay, cfg.decay,
                      cfg.grad_clip)


@functools.lru_cache
def _optimizer(schedule, b1, b2, eps, weight_decay, decay, grad_clip) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=weight_decay,
                        mask=functools.partial(decay_mask, decay=decay))
    if grad_clip > 0:
        return optax.chain(clip_grad_norm(grad_clip), adamw)
    return adamw


# -- state and steps ----------------------------------------------------------------
class TrainState(struct.PyTreeNode):
    """Everything a training step changes. `model` and `tx` are static (part
    of the tree structure), so one jit of train_step serves every run that
    shares them."""
    step: jax.Array  # () int32, optimizer steps taken
    params: Any
    opt_state: Any
    model: GPT = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: optax.Schedule = struct.field(pytree_node=False)  # the lr of tx, for the metrics


def make_model(mc: ModelConfig, tc: TrainConfig) -> GPT:
    """The model as the run computes it: tc's compute dtype (params stay
    float32), layer scan, remat and attention kernel. Scanned layers take
    stack_layers(params); checkpoints and model directories hold whichever
    layout the run trains in, save_model writes the unrolled one."""
    return GPT(mc, dtype=jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32, scan_layers=tc.scan_layers,
               remat=tc.remat, attention_impl=tc.attention_impl)


def create_state(model: GPT, params, cfg: TrainConfig) -> TrainState:
    tx = make_optimizer(cfg)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model=model,
                      tx=tx, schedule=lr_schedule(cfg))


def loss_fn(params, model: GPT, x, y, valid, rng, n_total, n_micro):
    """The micro-batch's share of the step's objective: its summed nll over
    the step's N valid positions (so A micro-batches add up to the big
    batch's mean) plus its share of the MoE load-balancing loss."""
    out = model.apply({"params": params}, x, valid=valid, deterministic=False, rngs={"dropout": rng})
    n = valid.sum().astype(jnp.float32)
    nll_sum = ops.cross_entropy(out.logits, y, valid) * n
    objective = nll_sum / n_total + model.cfg.aux_loss_coef * out.aux_loss / n_micro
    return objective, (nll_sum, out.aux_loss)


def step_fn(state: TrainState, batch: Batch, rng: jax.Array, axis_name: str | tuple[str, ...] | None = None):
    """One optimizer step on `batch` (A micro-batches, gradients accumulated
    in float32). Under pmap or shard_map (`axis_name`) each device holds a
    slice of every micro-batch and draws its own dropout masks; gradients,
    nll and token counts are summed over devices."""
    x, y, valid = batch  # (A, B, T) each
    n_micro = x.shape[0]
    n_total = valid.sum().astype(jnp.float32)
    n_shards = 1
    if axis_name is not None:
        n_total = jax.lax.psum(n_total, axis_name)
        n_shards = jax.lax.psum(1, axis_name)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    n_total = jnp.maximum(n_total, 1.0)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(grads, inputs):
        i, xi, yi, vi = inputs
        (_, (nll_sum, aux)), g = grad_fn(state.params, state.model, xi, yi, vi, jax.random.fold_in(rng, i),
                                         n_total, n_micro * n_shards)
        return jax.tree_util.tree_map(jnp.add, grads, g), (nll_sum, aux)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, (nll_sums, auxs) = jax.lax.scan(micro_step, zeros, (jnp.arange(n_micro), x, y, valid))
    nll_sum, aux = nll_sums.sum(), auxs.mean()
    if axis_name is not None:
        grads, nll_sum, aux = psum_flat((grads, nll_sum, aux / n_shards), axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll_sum / n_total, "aux_loss": aux, "grad_norm": optax.tree.norm(grads),
               "lr": state.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def psum_flat(tree, axis_name: str | tuple[str, ...]):
    """psum of a pytree as one flat float32 vector: one collective instead of
    one per leaf (XLA's CPU all-reduce meets the other devices once per buffer)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis_name))


train_step = jax.jit(step_fn, donate_argnums=0)
train_step.__doc__ = "step_fn jitted, the state donated: (state, batch (A, B, T) x3, rng) -> (state, metrics)."


@functools.partial(jax.jit, static_argnums=0)
def eval_loss(model: GPT, params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean next-token loss of one (B, T) batch, dropout off."""
    return ops.cross_entropy(model.apply({"params": params}, x).logits, y)  # (B, T, V) -> ()


class SingleDevice:
    """Runs the step on the default device. parallel.PmapRunner and
    parallel.MeshRunner have the same methods."""
    n_devices = 1

    def describe(self) -> str:
        return f"1 {jax.devices()[0].platform.upper()} device"

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state)

    def place_batch(self, batch) -> Batch:
        return tuple(jnp.asarray(a) for a in batch)

    def step(self, state: TrainState, batch: Batch, rng: jax.Array):
        return train_step(state, batch, rng)

    def eval_params(self, state: TrainState):
        """Params in the form eval_loss takes."""
        return state.params

    def checkpoint_state(self, state: TrainState) -> TrainState:
        """The state in the form Checkpoints.save takes (one copy, not per device)."""
        return state

    def metrics(self, metrics: dict) -> dict:
        return {k: float(v) for k, v in metrics.items()}


def make_runner(cfg: TrainConfig):
    """The runner train.parallel asks for; "auto" is a data-parallel (and,
    with train.fsdp, parameter-sharded) mesh over every device when there are
    several, else the single device."""
    if cfg.parallel == "single" or (cfg.parallel == "auto" and jax.device_count() == 1):
        return SingleDevice()
    n = jax.local_device_count() if cfg.parallel == "pmap" else jax.device_count()
    if cfg.batch_size % n:
        raise training.RunError(f"train.batch_size {cfg.batch_size} is not divisible by the {n} devices "
                                f"(on a CPU host: set train.cpu_devices to a divisor of it)")
    from jaxgpt import parallel
    return parallel.PmapRunner() if cfg.parallel == "pmap" else parallel.MeshRunner(cfg.fsdp)


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
    has started (jaxgpt.train.main called in a live process) nothing changes.
    Other backends (GPU, TPU) are untouched.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", cpu_device_count(cfg))
    except RuntimeError:  # the backends are already up
        pass


def step_key(seed: int, step: int) -> jax.Array:
    """The dropout key of optimizer step `step`: a function of (seed, step)
    only, so a resumed run draws the same dropout masks."""
    return _step_key(np.uint32(seed), np.uint32(step))


@jax.jit
def _step_key(seed, step):  # one dispatch per step instead of two eager ops
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def evaluate(model: GPT, params, batches) -> float:
    """Mean loss over the fixed evaluation batches."""
    return float(np.mean([float(eval_loss(model, params, jnp.asarray(x), jnp.asarray(y))) for x, y in batches]))


# -- checkpoints --------------------------------------------------------------------
class Checkpoints:
    """OUT_DIR/checkpoints: an orbax CheckpointManager of the train state
    (step, params, opt_state) plus a JSON record of the loop's own state
    (early stopping). Keeps the latest `keep` checkpoints and the best one
    by val loss. Saves are synchronous, so a checkpoint that exists is
    complete (orbax writes into a temporary directory and renames it)."""

    def __init__(self, directory: Path, keep: int):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, loop_state: dict, val_loss: float) -> None:
        step = int(state.step)
        arrays = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                        loop=ocp.args.JsonSave(loop_state)),
                          metrics={"val_loss": val_loss}, force=True)
        self.manager.wait_until_finished()

    def restore(self, state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The checkpointed state (host arrays shaped like `state`'s) and loop
        state of `step`, by default of the newest checkpoint that reads back.
        Newer ones that do not (cut short by a crash or a full disk) are
        renamed STEP.corrupt-TIME with a warning, never deleted; if none reads
        back (a different model config, say), nothing is renamed."""
        if step is not None:
            return self._restore(state, step)
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore(state, step)
            except Exception as e:  # orbax raises many types for missing or truncated files
                failed.append((step, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
                continue
            for bad, why in failed:
                aside = self.directory / f"{bad}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(bad)).rename(aside)
                print(f"warning: checkpoint {bad} is unreadable ({why}); moved it to {aside}, resuming from "
                      f"step {step}", file=sys.stderr)
            self.manager.reload()
            return restored
        if not failed:
            raise training.RunError(f"--resume: no complete checkpoint in {self.directory} (nothing to resume)")
        raise training.RunError(f"--resume: no checkpoint in {self.directory} can be restored into this run's "
                                f"model (newest, step {failed[0][0]}: {failed[0][1]})")

    def _restore(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                        {"step": state.step, "params": state.params, "opt_state": state.opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      loop=ocp.args.JsonRestore()))
        arrays = restored["state"]
        want, got = ({jax.tree_util.keystr(k): np.shape(a) for k, a in jax.tree_util.tree_leaves_with_path(tree)}
                     for tree in (target, arrays))
        if got != want:  # orbax restores the saved shapes, whatever the target's
            key = next(k for k in {**want, **got} if want.get(k) != got.get(k))
            raise CheckpointError(f"{key} has shape {got.get(key)}, this run's model has {want.get(key)}")
        return state.replace(step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"]), \
            dict(restored["loop"])

    def close(self) -> None:
        self.manager.close()


# -- sampling -----------------------------------------------------------------------
def sample(model: GPT, params, prompt_ids: list[int], n_tokens: int, temperature: float = 0.8,
           seed: int = 0) -> list[int]:
    """prompt_ids followed by n_tokens sampled ids (temperature 0: greedy).
    A plain loop over full forwards of a fixed (1, T) window, compiled once;
    jaxgpt.generate does this properly with a KV cache."""
    T = model.cfg.context_length
    ids = list(prompt_ids)
    key = jax.random.PRNGKey(seed)
    for i in range(n_tokens):
        context = ids[-T:]
        window = np.zeros((1, T), np.int32)  # (1, T), the context left-aligned
        window[0, :len(context)] = context
        next_id = _next_token(model, params, jnp.asarray(window), len(context), jax.random.fold_in(key, i),
                              temperature)
        ids.append(int(next_id))
    return ids


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(model: GPT, params, window, length, key, temperature):
    valid = jnp.arange(window.shape[1])[None, :] < length  # (1, T)
    logits = model.apply({"params": params}, window, valid=valid).logits[0, length - 1]  # (V,)
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


# -- the run ------------------------------------------------------------------------
def run(cfg: training.RunConfig, resume: bool = False) -> dict:
    """Train as `cfg` says, writing the run directory train.out_dir; returns
    a summary {"steps", "final_val_loss", "best_val_loss", "best_step", "stopped_early"}."""
    from tqdm import tqdm

    tc, dc = cfg.train, cfg.data
    out = Path(tc.out_dir).expanduser()
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    training.check_out_dir(out, resume)
    runner = make_runner(tc)  # before any file is written: a device count that cannot split the batch fails here
    text = training.load_corpus(dc)
    # fine-tuning (train.init_from): the source's params, tokenizer and architecture; a fresh optimizer
    tokenizer, source_params = training.setup_model(out, cfg, text, resume, load_model)
    mc: ModelConfig = cfg.model
    T = mc.context_length
    batches, evals, n_train_tokens = training.setup_data(out, cfg, text, tokenizer, lead and not resume)
    checkpoints = Checkpoints(out / "checkpoints", tc.keep_checkpoints)

    model = make_model(mc, tc)
    params = source_params if source_params is not None else init_params(mc, tc.seed)
    if tc.scan_layers:  # the unrolled init stacked: the same initial weights either way
        params = stack_layers(params, mc.n_layers)
    state = create_state(model, params, tc)
    stopper = training.EarlyStopping(tc.patience, tc.min_delta)
    start = 0
    if resume:
        state, loop_state = checkpoints.restore(state)
        stopper.load(loop_state["early_stopping"])
        start = int(state.step)
    log = training.MetricsLog(out / training.METRICS_FILE, start if resume else None)
    state = runner.place_state(state)
    print(training.describe_budget(count_params(params), tc, T, n_train_tokens))
    lead and print(f"devices: {runner.describe()}")

    if start == 0:
        val = evaluate(model, runner.eval_params(state), evals)
        lead and log.write({"step": 0, "val_loss": val})
    tokens_per_step = tc.batch_size * tc.grad_accum * T
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, disable=not lead,
               dynamic_ncols=True, file=sys.stderr)
    t0, last_logged = time.perf_counter(), start
    done = start
    for step in bar if not stopper.should_stop else ():
        batch = runner.place_batch(batches.batch(step))
        state, metrics = runner.step(state, batch, step_key(tc.seed, step))
        done = step + 1
        if done % tc.log_interval == 0 or done == tc.max_steps:
            m = runner.metrics(metrics)
            elapsed = time.perf_counter() - t0
            m["tok_per_s"] = (done - last_logged) * tokens_per_step / max(elapsed, 1e-9)
            t0, last_logged = time.perf_counter(), done
            lead and log.write({"step": done, **m})
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tok_per_s']:.0f}")
            training.check_finite(m, done)
        if done % tc.eval_interval == 0 or done == tc.max_steps:
            val = evaluate(model, runner.eval_params(state), evals)
            stopper.update(val, done)
            lead and log.write({"step": done, "val_loss": val, "best_val_loss": stopper.best})
            bar.write(f"step {done}: val loss {val:.4f} (best {stopper.best:.4f} at step {stopper.best_step})")
            training.check_finite({**runner.metrics(metrics), "val_loss": val}, done)  # never save NaN params
            checkpoints.save(runner.checkpoint_state(state), {"early_stopping": stopper.state()}, val)
            if stopper.should_stop:
                bar.write(f"early stopping: no improvement > {tc.min_delta} in {tc.patience} evaluations")
                break
    bar.close()

    final_val = [r["val_loss"] for r in training.read_metrics(out / training.METRICS_FILE) if "val_loss" in r][-1] \
        if lead else stopper.best
    best_params = jax.device_get(runner.eval_params(state))
    if 0 <= stopper.best_step != int(done):  # the best checkpoint is an earlier one
        best_params = checkpoints.restore(runner.checkpoint_state(state), stopper.best_step)[0].params
    checkpoints.close()
    if lead:
        save_model(out / "model", best_params, mc, out / "tokenizer.json", overwrite=True)
        training.plot_losses(out / training.METRICS_FILE, out / "loss.png")
        print(f"val loss: final {final_val:.4f}, best {stopper.best:.4f} at step {stopper.best_step}; "
              f"model in {out / 'model'}")
        if tc.sample_tokens > 0:
            text = write_sample(GPT(mc), unstack_layers(best_params), tokenizer, tc, out / "sample.txt")
            print(f"--- sample ---\n{text}")
    return {"steps": done, "final_val_loss": final_val, "best_val_loss": stopper.best,
            "best_step": stopper.best_step, "stopped_early": stopper.should_stop}


def write_sample(model: GPT, params, tokenizer, tc: TrainConfig, path: Path) -> str:
    """Sample tc.sample_tokens tokens after a newline (nanoGPT's start) into path."""
    prompt = tokenizer.encode("\n") if tokenizer.kind == "char" and tokenizer.token_to_id("\n") is not None else [0]
    ids = sample(model, params, prompt, tc.sample_tokens, tc.sample_temperature, tc.seed)
    text = tokenizer.decode(ids)
    path.write_text(text, encoding="utf-8")
    return text


def distributed(args) -> str | None:
    """The coordinator address of a multi-process run, if this is one."""
    return args.coordinator or os.environ.get("JAXGPT_COORDINATOR")


def init_distributed(args) -> None:
    """Multi-host: jax.distributed.initialize from --coordinator /
    --num-processes / --process-id, or JAXGPT_COORDINATOR / _NUM_PROCESSES /
    _PROCESS_ID. CPU processes talk over gloo. A process that stops sending
    heartbeats for JAXGPT_HEARTBEAT_TIMEOUT seconds (default 60) fails the
    others, so a hung or killed peer never leaves a run waiting forever."""
    address = distributed(args)
    if not address:
        return
    num = args.num_processes or int(os.environ.get("JAXGPT_NUM_PROCESSES", "1"))
    pid = args.process_id if args.process_id is not None else int(os.environ.get("JAXGPT_PROCESS_ID", "0"))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                   heartbeat_timeout_seconds=int(os.environ.get("JAXGPT_HEARTBEAT_TIMEOUT", "60")))
    except Exception as e:  # XlaRuntimeError and friends: unreachable coordinator, bad process id, ...
        raise training.RunError(f"cannot join the run at {address} as process {pid} of {num}: "
                                f"{(str(e).splitlines() or [''])[0]}") from None


def main(argv: list[str] | None = None) -> int:
    args = training.parse_args(argv, "python -m jaxgpt.train")
    try:
        cfg = training.load_run_config(args.config, args.overrides, args.resume)
        if not distributed(args):
            split_cpu(cfg.train)
        init_distributed(args)
        run(cfg, args.resume)
    except (*training.ERRORS, training.RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # Most likely a collective failed because another process died. Exit
        # now: jax's exit handler would wait for the dead process at a barrier.
        print(f"error: process {jax.process_index()} of {jax.process_count()}: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
