"""jaxgpt's engine for the shared training loop (gptcore.loop.Engine).

Parallel text: torchgpt/engine.py. The engine holds one TrainState and the
runner that places it on the devices; the loop never sees a jax array.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptcore import train_state
from gptcore.run import Run, RunError
from jaxgpt import generate
from jaxgpt.checkpoint import load_model, save_model
from jaxgpt.model import (
    count_params,
    load_state_arrays,
    stack_layers,
    state_arrays,
    unstack_layers,
)
from jaxgpt.runners import gather, make_runner
from jaxgpt.step import create_state, fresh_state, make_model, step_key
from jaxgpt.train_checkpoints import Checkpoints


class JaxEngine:
    def __init__(self, run: Run):
        tc, mc = run.train, run.model
        self.run = run
        if tc.attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise RunError(f"train.attention_impl = 'cudnn' needs an NVIDIA GPU; JAX runs on "
                           f"{jax.default_backend()} here: use 'einsum' or 'xla'")
        self.runner = make_runner(tc, mc)  # a device count that cannot split the batch fails here
        self.lead = jax.process_index() == 0  # the process that writes files other than checkpoints
        self.processes = jax.process_count()
        self.rows = self.runner.local_rows(tc.batch_size)  # of each batch, the ones this process reads
        self.model = make_model(mc, tc)
        if run.mode == "finetune":  # the source's params with a fresh optimizer
            params = load_model(run.init_from)[1]
            params = stack_layers(params, mc.n_layers) if tc.scan_layers else params
            self.state = self.runner.place_state(create_state(self.model, params, tc))
        else:  # created where it lives: sharded on a mesh, never whole on the host
            self.state = self.runner.init_state(functools.partial(fresh_state, self.model, mc, tc))
        self._n_params = count_params(self.runner.eval_params(self.state))
        self._checkpoints: Checkpoints | None = None
        self.best_params = None

    @property
    def checkpoints(self) -> Checkpoints:  # made on first use: a run that fails in setup leaves no checkpoints/
        if self._checkpoints is None:
            self._checkpoints = Checkpoints(self.run.out_dir / "checkpoints", self.run.train.keep_checkpoints,
                                            self.run.train.async_checkpoint)
        return self._checkpoints

    def barrier(self, name: str) -> None:
        if self.processes > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)

    def describe(self) -> str:
        return self.runner.describe()

    def n_params(self) -> int:
        return self._n_params

    def restore(self) -> tuple[int, dict]:
        directory = self.run.out_dir / "checkpoints"
        if self.checkpoints.latest_step() is None and train_state.exists(directory):  # a torchgpt run
            return self._restore_portable(directory)
        state, loop_state = self.checkpoints.restore(self.runner.checkpoint_state(self.state))
        self.state = self.runner.place_state(state)  # restored into the run's shardings already, on a mesh
        return int(jax.device_get(self.state.step)), loop_state

    def _restore_portable(self, directory) -> tuple[int, dict]:
        step, params, adam_m, adam_v, loop_state = train_state.read(directory)

        def tree(arrays):  # torch names and layout -> this run's params layout
            t = load_state_arrays(arrays, self.run.model)
            return stack_layers(t, self.run.model.n_layers) if self.run.train.scan_layers else t

        params = tree(params)
        count = jnp.asarray(step, jnp.int32)
        opt_state = optax.tree_utils.tree_set(self.state.tx.init(params), mu=tree(adam_m), nu=tree(adam_v),
                                              count=count)  # Adam's and the schedule's counts alike
        state = self.state.replace(step=count, params=params, opt_state=opt_state)
        # host copies, one per leaf: the counts share one array, and a donated step must not see it twice
        self.state = self.runner.place_state(jax.tree_util.tree_map(np.array, state))
        return step, loop_state

    def step(self, step: int, batch):
        self.state, metrics = self.runner.step(self.state, self.runner.place_batch(batch),
                                               step_key(self.run.train.seed, step))
        return metrics

    def metrics(self, handle) -> dict[str, float]:
        return self.runner.metrics(handle)

    def evaluate(self, batches) -> float:
        return self.runner.evaluate(self.state, batches)

    def save(self, step: int, loop_state: dict, val_loss: float, improved: bool) -> None:
        state = self.runner.checkpoint_state(self.state)
        self.checkpoints.save(state, loop_state, improved)
        if self.run.train.portable_state and self.processes == 1:
            state = jax.device_get(state)
            unrolled = [unstack_layers(t) if self.run.train.scan_layers else t for t in
                        (state.params, optax.tree_utils.tree_get(state.opt_state, "mu"),
                         optax.tree_utils.tree_get(state.opt_state, "nu"))]
            train_state.write(self.run.out_dir / "checkpoints", step, *(state_arrays(t) for t in unrolled),
                              loop_state)

    def load_best(self, best_step: int, step: int) -> None:
        params = self.runner.eval_params(self.state)
        if 0 <= best_step != step:  # the best checkpoint is an earlier one
            if best_step in self.checkpoints.all_steps():
                params = self.checkpoints.restore(self.runner.checkpoint_state(self.state), best_step)[0].params
            else:  # written by the other twin before this one resumed the run
                print(f"warning: the best checkpoint (step {best_step}) is not among jaxgpt's; exporting the "
                      f"weights after step {step}", file=sys.stderr)
        self.best_params = gather(params, keep=self.lead)  # only the lead exports and samples

    def export(self, directory: Path, tokenizer_file: Path) -> None:
        save_model(directory, self.best_params, self.run.model, tokenizer_file, overwrite=True)

    def sample(self, prompt_ids: list[int], n_tokens: int, temperature: float, seed: int) -> list[int]:
        chunks = generate.stream(unstack_layers(self.best_params), self.run.model, prompt_ids,
                                 max_new_tokens=n_tokens, temperature=temperature, rng=jax.random.PRNGKey(seed))
        return [t for chunk in chunks for t in chunk]

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.close()
