"""The training and data configs shared by both trainers, and the LR schedule.

Imports neither JAX nor PyTorch: `jaxgpt.train` and `torchgpt.train` read the
same `TrainConfig` / `DataConfig` (the [train] and [data] tables of a preset)
and take their learning rate from the same `lr_at`, so the two trainers
cannot disagree on a default or on the off-by-one of a schedule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gptcore.config import check_field_types, requirement

DECAYS = ("matrices", "all", "none")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
KERNELS = ("auto", "reference", "cpu")
PARALLELS = ("auto", "single", "pmap", "mesh")
TOKENIZERS = ("char", "bpe", "gpt2")  # or a path to a tokenizer.json
SAMPLERS = ("random", "sliding")
VAL_SPLITS = ("tail", "documents")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, checkpointing and parallelism of one run.

    One optimizer step sees batch_size * grad_accum sequences (global, over
    all devices): grad_accum micro-batches of batch_size whose gradients are
    accumulated before the update.
    """

    # batch and length
    batch_size: int = 64  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # optimizer steps

    # learning rate: see lr_at
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # step at which the cosine reaches min_lr; None: max_steps

    # AdamW (decoupled weight decay), every hyperparameter explicit: the
    # optax and torch defaults differ (weight decay 1e-4 vs 1e-2)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    decay: str = "matrices"  # "matrices": nanoGPT, every ndim >= 2 tensor (Linear and Embedding
    # weights) decays, biases and norm gains do not; "all"; "none"
    grad_clip: float = 1.0  # max global grad norm (torch's clip_grad_norm_ formula); 0: off

    # numerics and randomness
    dtype: str = "float32"  # compute dtype; "bfloat16" keeps float32 master weights
    loss_chunk: int = 1024  # the loss over a vocabulary of >= CHUNKED_LOSS_VOCAB words is computed this many
    # tokens at a time, each slice's gradients made with its logits (never all B x T x V at once); 0: off
    # jaxgpt's compiled step (the function computed is the same; torchgpt ignores them)
    scan_layers: bool = False  # one compiled layer body run L times (fast compiles of deep models)
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    attention_impl: str = "einsum"  # "einsum" (ours), "xla" or "cudnn" (jax.nn.dot_product_attention)
    kernels: str = "auto"  # norm / attention / Dense code: "reference" (autodiff), "cpu" (jaxgpt.cpu_kernels,
    # XLA:CPU fast paths), "auto": "cpu" when JAX runs on the CPU
    seed: int = 1337  # init, batches and dropout

    # evaluation, early stopping, logging
    eval_interval: int = 250  # steps between val evaluations (and checkpoints)
    eval_batches: int = 20  # batches per evaluation
    patience: int = 0  # stop after this many evaluations without improvement; 0: never
    min_delta: float = 0.0  # an improvement must lower the best val loss by more than this
    log_interval: int = 10  # steps between metrics.jsonl records
    tensorboard: bool = False  # also write TensorBoard event files to OUT_DIR/tensorboard (needs tensorboardX)
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs wandb;
    # WANDB_MODE=offline works without a network)

    # outputs
    out_dir: str = "out"
    keep_checkpoints: int = 2  # latest checkpoints kept (the best one is kept as well)
    portable_state: bool = True  # also write checkpoints/portable.safetensors (params + Adam moments, 3x the
    # params) at each checkpoint, so the other twin can --resume the run (gptcore.train_state)
    async_checkpoint: bool = False  # jaxgpt: write checkpoints in the background while training goes on (a
    # checkpoint that exists is still complete); torchgpt saves synchronously
    init_from: str | None = None  # model or run directory to fine-tune from (params only)
    sample_tokens: int = 200  # tokens sampled at the end of training; 0: none
    sample_temperature: float = 0.8

    # parallelism (jaxgpt)
    parallel: str = "auto"  # "auto": "mesh" over every device when there are several, else "single";
    # "single" device, "pmap" data parallel, "mesh" (data x fsdp x tensor) jit
    fsdp: int = 1  # size of the mesh's "fsdp" axis (parameter sharding); mesh / auto only
    tensor: int = 1  # size of the mesh's "tensor" axis (Megatron-style heads / MLP / vocab); mesh / auto only;
    # the "data" axis takes the devices fsdp x expert x tensor leave (jaxgpt.sharding)
    expert: int = 1  # size of the mesh's "expert" axis (a mixture of experts' experts split over it); mesh / auto
    cpu_devices: int = 0  # on a CPU host, the XLA CPU devices `python -m jaxgpt.train` splits it into, so
    # that data parallelism puts every core to work; 0: one per core (fewer if batch_size needs it)

    def __post_init__(self):
        check_field_types(self, _CHOICES)
        _check_values(self)

    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    corpus: str = "shakespeare"  # gptcore.documents: shakespeare | tinyshakespeare | gutenberg | a file or a
    # directory of .txt / .jsonl(.gz) / .parquet files | hf:NAME[:CONFIG][:SPLIT]
    tokenizer: str = "char"  # "char", byte-level "bpe" (trained on the corpus), "gpt2" (GPT-2's, downloaded
    # once into cache_dir) or the path of a Hugging Face tokenizer.json
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.1  # the share of the tokens (or documents) held out for validation
    val_split: str = "tail"  # "tail": the stream's last val_fraction (nanoGPT); "documents": every k-th document
    sampler: str = "random"  # "random" windows (nanoGPT) or "sliding" windows (seed 003)
    stride: int | None = None  # sliding windows' stride; None: block_size
    cache_dir: str = "~/.cache/jaxgpt"  # downloaded corpora
    tokens: str | None = None  # a token dataset directory written by jaxgpt.prepare: trains on it (corpus unread)
    text_field: str = "text"  # the field of a jsonl record / parquet column / hf: row holding the text
    num_proc: int = 0  # encoding processes (0: one per core; small corpora are encoded in-process)

    def __post_init__(self):
        check_field_types(self, _CHOICES)
        _check_values(self)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHUNKED_LOSS_VOCAB = 8192  # below this the (B, T, V) logits are small: the plain loss


def loss_chunk(vocab_size: int, n_tokens: int, chunk: int) -> int:
    """Tokens per slice of the chunked cross-entropy (train.loss_chunk =
    chunk) for a micro-batch of n_tokens, or 0 for the plain loss: a small
    vocabulary, chunking off, or a micro-batch that fits one slice. Both
    trainers use this rule."""
    return 0 if chunk == 0 or vocab_size < CHUNKED_LOSS_VOCAB or n_tokens <= chunk else chunk


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based: the first update uses
    lr_at(0)). nanoGPT's get_lr exactly:

    - linear warmup for step < warmup_steps: lr * (step + 1) / (warmup_steps + 1),
      so the first step already moves (lr / (warmup + 1)) and none reaches lr;
    - step >= decay_steps: min_lr;
    - in between, cosine from lr (at step == warmup_steps) down to min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.decay_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps)  # in [0, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


_CHOICES = {"decay": DECAYS, "dtype": DTYPES, "attention_impl": ATTENTION_IMPLS, "kernels": KERNELS,
            "parallel": PARALLELS,
            "sampler": SAMPLERS, "val_split": VAL_SPLITS}


def _check_values(c) -> None:
    require = requirement(c)

    if isinstance(c, DataConfig):
        require(c.tokenizer in TOKENIZERS or c.tokenizer.endswith(".json"), "tokenizer",
                f"must be one of {', '.join(TOKENIZERS)} or the path of a tokenizer.json (got {c.tokenizer!r})")
        require(c.bpe_vocab_size > 0, "bpe_vocab_size", "must be positive")
        require(0.0 < c.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        require(c.stride is None or c.stride > 0, "stride", "must be positive")
        require(c.num_proc >= 0, "num_proc", "must be >= 0 (0: one per core)")
        return
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                 "keep_checkpoints", "fsdp", "tensor", "expert"):
        require(getattr(c, name) > 0, name, "must be positive")
    for name in ("warmup_steps", "patience", "sample_tokens", "cpu_devices", "loss_chunk"):
        require(getattr(c, name) >= 0, name, "must be >= 0")
    require(c.lr > 0.0, "lr", "must be positive")
    require(0.0 <= c.min_lr <= c.lr, "min_lr", f"must be in [0, lr={c.lr}]")
    require(c.lr_decay_steps is None or c.lr_decay_steps >= c.warmup_steps, "lr_decay_steps",
            f"must be >= warmup_steps={c.warmup_steps}")
    require(0.0 <= c.beta1 < 1.0, "beta1", "must be in [0, 1)")
    require(0.0 <= c.beta2 < 1.0, "beta2", "must be in [0, 1)")
    require(c.adam_eps > 0.0, "adam_eps", "must be positive")
    require(c.weight_decay >= 0.0, "weight_decay", "must be >= 0")
    require(c.grad_clip >= 0.0, "grad_clip", "must be >= 0 (0 turns clipping off)")
    require(c.min_delta >= 0.0, "min_delta", "must be >= 0")
    require(c.sample_temperature >= 0.0, "sample_temperature", "must be >= 0 (0: greedy)")
    require(0 <= c.seed < 2 ** 32, "seed", "must be in [0, 2**32)")
    require(c.out_dir.strip() not in ("", "."), "out_dir",
            "must name a run directory (not the current one: a run writes several files and folders)")
    for name in ("fsdp", "tensor", "expert"):
        require(getattr(c, name) == 1 or c.parallel in ("mesh", "auto"), name,
                "sharding needs train.parallel = \"mesh\" (or \"auto\")")
