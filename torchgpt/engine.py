"""torchgpt's engine for the shared training loop (gptcore.loop.Engine).

Parallel text: jaxgpt/engine.py. The engine holds the model and its
optimizer; the reference trainer is one process on one device (CPU or a
GPU), in float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptcore import train_state
from gptcore.run import Run, RunError
from torchgpt import generate
from torchgpt import step as steps
from torchgpt.checkpoint import load_model, save_model
from torchgpt.model import GPT, count_params
from torchgpt.optim import make_optimizer
from torchgpt.train_checkpoints import resume_checkpoint, save_checkpoint


class TorchEngine:
    lead, processes, rows = True, 1, None  # one process, reading every row of a batch

    def __init__(self, run: Run):
        tc, mc = run.train, run.model
        if tc.parallel not in ("auto", "single") or tc.dtype != "float32":
            raise RunError("torchgpt.train is the single-device float32 reference "
                           "(train.parallel = \"single\", train.dtype = \"float32\")")
        self.run = run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(tc.seed)
        model = GPT(mc)
        if run.mode == "finetune":  # the source's weights with a fresh optimizer
            model.load_state_dict(load_model(run.init_from)[1].state_dict())
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, tc)
        self.directory = run.out_dir / "checkpoints"

    def barrier(self, name: str) -> None:
        pass  # one process

    def describe(self) -> str:
        return f"1 {self.device.type.upper()} device (torch)"

    def n_params(self) -> int:
        return count_params(self.model)

    def restore(self) -> tuple[int, dict]:
        own = any((self.directory / name).is_file() for name in ("latest.pt", "best.pt"))
        if not own and train_state.exists(self.directory):  # a jaxgpt run
            return self._restore_portable()
        return resume_checkpoint(self.directory, self.model, self.optimizer)

    def _restore_portable(self) -> tuple[int, dict]:
        step, params, adam_m, adam_v, loop_state = train_state.read(self.directory)
        self.model.load_state_dict({k: torch.from_numpy(a) for k, a in params.items()}, strict=True)
        for name, p in self.model.named_parameters():  # AdamW's own state, as after `step` steps
            self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                       "exp_avg": torch.from_numpy(adam_m[name]).to(self.device),
                                       "exp_avg_sq": torch.from_numpy(adam_v[name]).to(self.device)}
        return step, loop_state

    def step(self, step: int, batch):
        batch = tuple(torch.from_numpy(a).to(self.device) for a in batch)
        return steps.train_step(self.model, self.optimizer, batch, step, self.run.train)

    def metrics(self, handle) -> dict[str, float]:
        return dict(handle)

    def evaluate(self, batches) -> float:
        return steps.evaluate(self.model, batches, self.device, self.run.train.loss_chunk)

    def save(self, step: int, loop_state: dict, val_loss: float, improved: bool) -> None:
        save_checkpoint(self.directory / "latest.pt", self.model, self.optimizer, step, loop_state)
        if improved:
            save_checkpoint(self.directory / "best.pt", self.model, self.optimizer, step, loop_state)
        if self.run.train.portable_state:
            named = dict(self.model.named_parameters())
            arrays = [{n: t.detach().cpu().numpy() for n, t in tensors.items()} for tensors in (
                named, {n: self.optimizer.state[p]["exp_avg"] for n, p in named.items()},
                {n: self.optimizer.state[p]["exp_avg_sq"] for n, p in named.items()})]
            train_state.write(self.directory, step, *arrays, loop_state)

    def load_best(self, best_step: int, step: int) -> None:
        if 0 <= best_step != step:  # the best checkpoint is an earlier one
            best = self.directory / "best.pt"
            ckpt = torch.load(best, map_location=self.device, weights_only=True) if best.is_file() else None
            if ckpt is not None and ckpt["step"] == best_step:
                self.model.load_state_dict(ckpt["model"])
            else:  # written by the other twin before this one resumed the run
                print(f"warning: the best checkpoint (step {best_step}) is not among torchgpt's; exporting the "
                      f"weights after step {step}", file=sys.stderr)
        self.model.eval()

    def export(self, directory: Path, tokenizer_file: Path) -> None:
        save_model(directory, self.model, self.run.model, tokenizer_file, overwrite=True)

    def sample(self, prompt_ids: list[int], n_tokens: int, temperature: float, seed: int) -> list[int]:
        chunks = generate.stream(self.model, prompt_ids, max_new_tokens=n_tokens, temperature=temperature,
                                 generator=torch.Generator().manual_seed(seed))
        return [t for chunk in chunks for t in chunk]

    def close(self) -> None:
        pass
