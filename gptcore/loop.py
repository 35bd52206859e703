"""The training loop, written once for both twins.

    run    = gptcore.run.resolve(preset, overrides, resume)
    engine = jaxgpt.engine.JaxEngine(run)      # or torchgpt.engine.TorchEngine(run)
    summary = train(run, engine)

The loop owns the run directory, the batches, the schedule of logs,
evaluations and checkpoints, early stopping and the divergence check; the
engine owns the model, the optimizer state, the devices and the checkpoint
format. Several processes (jax.distributed) all run the loop and every engine
call, in the same order; only the lead process (`engine.lead`) writes the
run's files other than checkpoints, prints and draws the progress bar.

SIGINT (Ctrl-C) and SIGTERM stop a single-process run after the step in
progress: a checkpoint of that step, one line saying how to resume, exit
status 128 + the signal. A second signal stops at once (KeyboardInterrupt);
checkpoints are written atomically, so the previous ones stay intact.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from gptcore import training
from gptcore.errors import Stopped
from gptcore.lock import run_lock
from gptcore.loggers import Loggers
from gptcore.run import Run, check_out_dir
from gptcore.tokenizer import FILENAME as TOKENIZER_FILE


class Engine(Protocol):
    """One twin's side of a training run, built from a Run: the model (fresh,
    or the fine-tune source's weights) and its optimizer, ready to step."""

    lead: bool  # this process writes the run's files
    processes: int  # processes running the loop together (jax.distributed), 1 otherwise
    rows: Any  # the rows of each batch this process reads (an int array), or None: all of them

    def describe(self) -> str:
        """The devices it trains on, one line."""

    def barrier(self, name: str) -> None:
        """Wait until every process of the run gets here (no-op for one process)."""

    def n_params(self) -> int: ...

    def restore(self) -> tuple[int, dict]:
        """Resume: load the newest checkpoint that reads back; (its step, the loop state saved with it)."""

    def step(self, step: int, batch) -> Any:
        """One optimizer step on a batch (x, y, valid numpy (A, B, T), B: the rows this process reads);
        metrics, maybe not yet computed."""

    def metrics(self, handle: Any) -> dict[str, float]:
        """A step's metrics as floats: loss, aux_loss, grad_norm, lr."""

    def evaluate(self, batches: list) -> float:
        """Mean loss over the (x, y) val batches, dropout off."""

    def save(self, step: int, loop_state: dict, val_loss: float, improved: bool) -> None:
        """A checkpoint of the state after `step` steps (improved: the best val loss so far)."""

    def load_best(self, best_step: int, step: int) -> None:
        """Put the weights of the best checkpoint (best_step) in place of those after `step`."""

    def export(self, directory: Path, tokenizer_file: Path) -> None:
        """The current weights as a model directory (lead only)."""

    def sample(self, prompt_ids: list[int], n_tokens: int, temperature: float, seed: int) -> list[int]:
        """The twin's own generator: n_tokens new ids after prompt_ids (lead only)."""

    def close(self) -> None: ...


def train(run: Run, engine: Engine) -> dict:
    """Train as `run` says, writing its directory; returns a summary
    {"steps", "final_val_loss", "best_val_loss", "best_step", "stopped_early"}.
    The lead process holds the directory's lock throughout (gptcore.lock) and,
    once it has it, checks the directory again: a trainer that started at the
    same moment and got there first has made it a run. A new run that fails
    before its first checkpoint (a kernel this machine lacks, memory, a bug)
    removes what it wrote: it started in an empty or new directory."""
    if not engine.lead:
        return _train(run, engine)
    created = not run.out_dir.exists()
    with run_lock(run.out_dir):
        check_out_dir(run.out_dir, run.mode == "resume")
        try:
            return _train(run, engine)
        except Exception:
            if run.mode != "resume" and not training.has_checkpoint(run.out_dir):
                training.remove_new_run(run.out_dir, created)  # the corrected command can run as it was
            raise


def _train(run: Run, engine: Engine) -> dict:
    from tqdm import tqdm

    tc, out, lead = run.train, run.out_dir, engine.lead
    say = print if lead else (lambda *args, **kwargs: None)
    T = run.model.context_length
    # a corpus shorter than a window fails here; the lead encodes first, so processes sharing the
    # run directory find its files made, and processes on a disk of their own make their own
    train_tokens, val_tokens = training.prepare_data(run) if lead else (None, None)
    engine.barrier("data")
    if not lead:
        train_tokens, val_tokens = training.prepare_data(run)
    batches = training.TrainBatches(train_tokens, T, tc, run.data)
    evals = training.val_batches(val_tokens, T, tc)
    if run.mode != "resume" and lead:
        training.write_run_files(run)

    stopper = training.EarlyStopping(tc.patience, tc.min_delta)
    start, last_val = 0, None
    if run.mode == "resume":
        start, loop_state = engine.restore()
        stopper.load(loop_state["early_stopping"])
        last_val = loop_state.get("val_loss")
    resumed = run.mode == "resume"
    log = training.MetricsLog(out / training.METRICS_FILE, start if resumed else None, lead,
                              also=Loggers(tc, out, run.to_dict(), resumed, lead))
    say(training.describe_budget(engine.n_params(), tc, T, len(train_tokens)))
    say(f"devices: {engine.describe()}")
    if run.mode == "finetune":
        say(f"fine-tuning {run.init_from} (its weights, architecture and tokenizer)")
    if start == 0:
        last_val = engine.evaluate(evals)
        log.write({"step": 0, "val_loss": last_val})

    tokens_per_step = tc.batch_size * tc.grad_accum * T
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, disable=not lead,
               dynamic_ncols=True, file=sys.stderr)
    t0, last_logged, done = time.perf_counter(), start, start
    began = t0  # val records carry the loop's wall time so far (time_s; a resumed run counts from its restart)
    with stop_signals(enabled=engine.processes == 1) as stop:
        for step in bar if not stopper.should_stop else ():
            handle = engine.step(step, batches.batch(step, engine.rows))
            done = step + 1
            if done % tc.log_interval == 0 or done == tc.max_steps:
                m = engine.metrics(handle)
                m["tok_per_s"] = (done - last_logged) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                t0, last_logged = time.perf_counter(), done
                log.write({"step": done, **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tok_per_s']:.0f}")
                training.check_finite(m, done)
            if done % tc.eval_interval == 0 or done == tc.max_steps:
                last_val = engine.evaluate(evals)
                improved = stopper.update(last_val, done)
                log.write({"step": done, "val_loss": last_val, "best_val_loss": stopper.best,
                           "time_s": round(time.perf_counter() - began, 3)})
                lead and bar.write(f"step {done}: val loss {last_val:.4f} (best {stopper.best:.4f} at step "
                                   f"{stopper.best_step})")
                training.check_finite({**engine.metrics(handle), "val_loss": last_val}, done)  # no NaN params saved
                engine.save(done, {"early_stopping": stopper.state(), "val_loss": last_val}, last_val, improved)
                if stopper.should_stop:
                    lead and bar.write(f"early stopping: no improvement > {tc.min_delta} in {tc.patience} "
                                       f"evaluations")
                    break
            if stop:
                bar.close()
                log.close()
                stop_after(run, engine, handle, done, {"early_stopping": stopper.state(), "val_loss": last_val},
                           stop[0])
    bar.close()
    log.close()

    engine.load_best(stopper.best_step, done)
    engine.close()
    final_val = stopper.best if last_val is None else last_val
    if lead:
        engine.export(out / "model", out / TOKENIZER_FILE)
        training.plot_losses(out / training.METRICS_FILE, out / "loss.png")
        say(f"val loss: final {final_val:.4f}, best {stopper.best:.4f} at step {stopper.best_step}; "
            f"model in {out / 'model'}")
        if tc.sample_tokens > 0:
            say(f"--- sample ---\n{write_sample(run, engine, out / 'sample.txt')}")
    return {"steps": done, "final_val_loss": final_val, "best_val_loss": stopper.best,
            "best_step": stopper.best_step, "stopped_early": stopper.should_stop}


def stop_after(run: Run, engine: Engine, handle, done: int, loop_state: dict, signum: int):
    """The end of a run stopped by a signal after step `done`: its checkpoint
    (unless that step's evaluation just wrote one; inf as its val loss, so it
    never counts as the best), then Stopped with the way to resume."""
    tc = run.train
    if done % tc.eval_interval and done != tc.max_steps:
        training.check_finite(engine.metrics(handle), done)
        engine.save(done, loop_state, math.inf, False)
    engine.close()
    raise Stopped(f"stopped by {signal.Signals(signum).name} after step {done}, checkpoint saved; continue with: "
                  f"--resume train.out_dir={run.out_dir}", 128 + signum)


def write_sample(run: Run, engine: Engine, path: Path) -> str:
    """train.sample_tokens tokens after a newline (nanoGPT's start) into
    path; a tokenizer with no newline starts from its eos (GPT-2's start),
    which the text leaves out."""
    tok, tc = run.tokenizer, run.train
    prompt = tok.encode("\n") if tok.kind != "char" or tok.token_to_id("\n") is not None else []
    newline = bool(prompt) and tok.decode(prompt) == "\n"
    if not newline:
        prompt = [tok.eos_id if tok.eos_id is not None else 0]
    ids = engine.sample(prompt, tc.sample_tokens, tc.sample_temperature, tc.seed)
    text = tok.decode(prompt + ids if newline else ids)
    path.write_text(text, encoding="utf-8")
    return text


@contextlib.contextmanager
def stop_signals(enabled: bool = True):
    """While training: SIGINT and SIGTERM append their number to the yielded
    list (the loop checks it after each step); a second one raises
    KeyboardInterrupt at once. Nothing is installed when not enabled (several
    processes must agree on the step they stop at) or outside the main thread."""
    requested: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
