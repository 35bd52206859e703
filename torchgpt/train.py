"""Training in PyTorch, the reference: `python -m torchgpt.train --config PRESET key=value ... [--resume]`.

Parallel text: jaxgpt/train.py. Same TrainConfig, the same lr_at, the same
decay mask (nanoGPT's ndim >= 2 rule as two param groups), torch's own
clip_grad_norm_, the same gradient accumulation and the same batches. One
optimizer step:

    grads = sum over A micro-batches of d/dparams [ sum_valid nll / N_valid_total + coef * aux / A ]
    grads = grads * min(1, clip / (|grads| + 1e-6))          # clip_grad_norm_
    params = AdamW(lr_at(step), betas, eps, weight_decay on matrices only)(grads)

Single process, CPU or one GPU. Checkpoints are OUT_DIR/checkpoints/latest.pt
and best.pt; the best weights go to the model directory OUT_DIR/model
(torchgpt.checkpoint.save_model, readable by both twins).

Shape legend: A micro-batches per step, B batch, T block size, V vocab.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from gptcore import training
from gptcore.config import ModelConfig
from gptcore.train_config import TrainConfig, lr_at
from torchgpt import ops
from torchgpt.checkpoint import CheckpointError, load_model, save_model
from torchgpt.model import GPT, count_params


# -- optimizer ----------------------------------------------------------------------
def decay_names(model: torch.nn.Module, decay: str = "matrices") -> set[str]:
    """Names of the parameters weight decay applies to. "matrices" is
    nanoGPT's rule: every parameter with ndim >= 2 (Linear and Embedding
    weights); biases and norm gains do not decay."""
    return {n for n, p in model.named_parameters() if decay == "all" or (decay == "matrices" and p.dim() >= 2)}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with every hyperparameter explicit (torch's weight_decay default
    is 1e-2, optax's 1e-4) and two param groups for the decay mask."""
    decayed = decay_names(model, cfg.decay)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             amsgrad=False, foreach=False, fused=False)


# -- steps --------------------------------------------------------------------------
def loss_fn(model: GPT, x, y, valid, n_total, n_micro):
    """The micro-batch's share of the step's objective (see jaxgpt.train.loss_fn)."""
    out = model(x, valid=valid)
    n = valid.sum().float()
    nll_sum = ops.cross_entropy(out.logits, y, valid) * n
    objective = nll_sum / n_total + model.cfg.aux_loss_coef * out.aux_loss / n_micro
    return objective, (nll_sum, out.aux_loss)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch, step: int, cfg: TrainConfig) -> dict:
    """One optimizer step on `batch` (x, y, valid each (A, B, T)); gradients
    of the A micro-batches accumulate in .grad."""
    x, y, valid = batch  # (A, B, T) each
    n_micro = x.shape[0]
    n_total = valid.sum().float().clamp(min=1.0)
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    optimizer.zero_grad(set_to_none=True)
    nll_sum, aux = 0.0, 0.0
    for i in range(n_micro):
        objective, (nll_i, aux_i) = loss_fn(model, x[i], y[i], valid[i], n_total, n_micro)
        objective.backward()
        nll_sum, aux = nll_sum + nll_i.detach(), aux + aux_i.detach() / n_micro
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the norm before clipping
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    optimizer.step()
    return {"loss": float(nll_sum / n_total), "aux_loss": float(aux), "grad_norm": float(grad_norm), "lr": lr}


@torch.no_grad()
def evaluate(model: GPT, batches, device) -> float:
    """Mean loss over the fixed evaluation batches, dropout off."""
    model.eval()
    losses = [float(ops.cross_entropy(model(torch.from_numpy(x).to(device)).logits, torch.from_numpy(y).to(device)))
              for x, y in batches]
    return float(np.mean(losses))


# -- checkpoints --------------------------------------------------------------------
def save_checkpoint(path: Path, model, optimizer, step: int, loop_state: dict) -> None:
    """Atomically: model, optimizer and RNG state, step, the loop's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": torch.get_rng_state(), "loop": loop_state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, dict]:
    """weights_only: a checkpoint is data, never code to unpickle."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["loop"]


def resume_checkpoint(directory: Path, model, optimizer) -> tuple[int, dict]:
    """latest.pt, or best.pt (with a warning) when latest.pt does not read
    back; neither file is modified."""
    failed = []
    for name in ("latest.pt", "best.pt"):
        if not (directory / name).is_file():
            continue
        try:
            step, loop_state = load_checkpoint(directory / name, model, optimizer)
        except Exception as e:  # truncated file (RuntimeError, EOFError, ...) or another model's weights
            failed.append(f"{name}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
            continue
        if failed:
            print(f"warning: {failed[0]}; resuming from {name} (step {step})", file=sys.stderr)
        return step, loop_state
    raise training.RunError(f"--resume: no checkpoint in {directory} can be restored into this run's model "
                            f"({'; '.join(failed) or 'no latest.pt or best.pt'})")


# -- sampling -----------------------------------------------------------------------
@torch.no_grad()
def sample(model: GPT, prompt_ids: list[int], n_tokens: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
    """prompt_ids followed by n_tokens sampled ids (temperature 0: greedy)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        context = torch.tensor([ids[-model.cfg.context_length:]], device=device)  # (1, T)
        logits = model(context).logits[0, -1].float().cpu()  # (V,)
        if temperature > 0:
            ids.append(int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)))
        else:
            ids.append(int(logits.argmax()))
    return ids


# -- the run ------------------------------------------------------------------------
def run(cfg: training.RunConfig, resume: bool = False) -> dict:
    """Train as `cfg` says into train.out_dir; returns the same summary as jaxgpt.train.run."""
    from tqdm import tqdm

    tc, dc = cfg.train, cfg.data
    if tc.parallel not in ("auto", "single") or tc.dtype != "float32":
        raise training.RunError("torchgpt.train is the single-device float32 reference "
                                "(train.parallel = \"single\", train.dtype = \"float32\")")
    out = Path(tc.out_dir).expanduser()
    training.check_out_dir(out, resume)
    text = training.load_corpus(dc)
    # fine-tuning (train.init_from): the source's weights, tokenizer and architecture; a fresh optimizer
    tokenizer, source_weights = training.setup_model(out, cfg, text, resume, load_model)
    mc: ModelConfig = cfg.model
    T = mc.context_length
    batches, evals, n_train_tokens = training.setup_data(out, cfg, text, tokenizer, not resume)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    model = GPT(mc)
    if source_weights is not None:
        model.load_state_dict(source_weights.state_dict())
    model = model.to(device)
    optimizer = make_optimizer(model, tc)
    stopper = training.EarlyStopping(tc.patience, tc.min_delta)
    ckpt_dir = out / "checkpoints"
    start = 0
    if resume:
        start, loop_state = resume_checkpoint(ckpt_dir, model, optimizer)
        stopper.load(loop_state["early_stopping"])
    log = training.MetricsLog(out / training.METRICS_FILE, start if resume else None)
    print(training.describe_budget(count_params(model), tc, T, n_train_tokens))

    if start == 0:
        log.write({"step": 0, "val_loss": evaluate(model, evals, device)})
    tokens_per_step = tc.batch_size * tc.grad_accum * T
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, dynamic_ncols=True, file=sys.stderr)
    t0, last_logged = time.perf_counter(), start
    done = start
    for step in bar if not stopper.should_stop else ():
        batch = tuple(torch.from_numpy(a).to(device) for a in batches.batch(step))
        m = train_step(model, optimizer, batch, step, tc)
        done = step + 1
        if done % tc.log_interval == 0 or done == tc.max_steps:
            elapsed = time.perf_counter() - t0
            m["tok_per_s"] = (done - last_logged) * tokens_per_step / max(elapsed, 1e-9)
            t0, last_logged = time.perf_counter(), done
            log.write({"step": done, **m})
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tok_per_s']:.0f}")
            training.check_finite(m, done)
        if done % tc.eval_interval == 0 or done == tc.max_steps:
            val = evaluate(model, evals, device)
            improved = stopper.update(val, done)
            log.write({"step": done, "val_loss": val, "best_val_loss": stopper.best})
            bar.write(f"step {done}: val loss {val:.4f} (best {stopper.best:.4f} at step {stopper.best_step})")
            training.check_finite({**m, "val_loss": val}, done)  # never save NaN params
            save_checkpoint(ckpt_dir / "latest.pt", model, optimizer, done, {"early_stopping": stopper.state()})
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", model, optimizer, done, {"early_stopping": stopper.state()})
            if stopper.should_stop:
                bar.write(f"early stopping: no improvement > {tc.min_delta} in {tc.patience} evaluations")
                break
    bar.close()

    final_val = [r["val_loss"] for r in training.read_metrics(out / training.METRICS_FILE) if "val_loss" in r][-1]
    if (ckpt_dir / "best.pt").is_file():
        model.load_state_dict(torch.load(ckpt_dir / "best.pt", map_location=device, weights_only=True)["model"])
    save_model(out / "model", model, mc, out / "tokenizer.json", overwrite=True)
    training.plot_losses(out / training.METRICS_FILE, out / "loss.png")
    print(f"val loss: final {final_val:.4f}, best {stopper.best:.4f} at step {stopper.best_step}; "
          f"model in {out / 'model'}")
    if tc.sample_tokens > 0:
        prompt = tokenizer.encode("\n") if tokenizer.kind == "char" and tokenizer.token_to_id("\n") is not None else [0]
        sample_text = tokenizer.decode(sample(model, prompt, tc.sample_tokens, tc.sample_temperature, tc.seed))
        (out / "sample.txt").write_text(sample_text, encoding="utf-8")
        print(f"--- sample ---\n{sample_text}")
    return {"steps": done, "final_val_loss": final_val, "best_val_loss": stopper.best,
            "best_step": stopper.best_step, "stopped_early": stopper.should_stop}


def main(argv: list[str] | None = None) -> int:
    args = training.parse_args(argv, "python -m torchgpt.train")
    try:
        run(training.load_run_config(args.config, args.overrides, args.resume), args.resume)
    except (*training.ERRORS, training.RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
