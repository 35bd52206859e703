"""nanoGPT's CPU Shakespeare run, re-typed as one small torch script, to
compare val losses with `python -m jaxgpt.train --config nanogpt_shakespeare_char`.

    python benchmarks/nanogpt_reference.py --data ../shared/data/tinyshakespeare.txt --seed 1 --eval-iters 200

It follows what nanoGPT's model.py and train.py do for `config/train_shakespeare_char.py`
with the README's CPU overrides (block 64, batch 12, 4 layers, 4 heads, 128 dims, no
dropout, 2000 iters, lr 1e-3 -> 1e-4, warmup 100, beta2 0.99): bias-free Linear and
LayerNorm, tied embeddings, N(0, 0.02) init with c_proj at 0.02 / sqrt(2 n_layer),
AdamW decaying every >= 2-D tensor, clip 1.0, prepare.py's 90/10 char split, random
windows, and the val loss estimated on `--eval-iters` random val batches after 2000
updates. It shares no code with this project, so it checks the data split, init and
schedule as well as the model.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK, BATCH, LAYERS, HEADS, DIM, ITERS, WARMUP = 64, 12, 4, 4, 128, 2000, 100
LR, MIN_LR = 1e-3, 1e-4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(DIM, bias=False), nn.LayerNorm(DIM, bias=False)
        self.c_attn = nn.Linear(DIM, 3 * DIM, bias=False)
        self.attn_proj = nn.Linear(DIM, DIM, bias=False)
        self.c_fc = nn.Linear(DIM, 4 * DIM, bias=False)
        self.mlp_proj = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, HEADS, C // HEADS).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, DIM), nn.Embedding(BLOCK, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM, bias=False)
        self.lm_head = nn.Linear(DIM, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * LAYERS))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="tiny Shakespeare input.txt")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-iters", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    text = open(args.data, encoding="utf-8").read()
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    split = int(0.9 * len(text))
    data = {"train": np.array([stoi[c] for c in text[:split]], np.int64),
            "val": np.array([stoi[c] for c in text[split:]], np.int64)}

    def batch(name):
        d = data[name]
        ix = torch.randint(len(d) - BLOCK, (BATCH,)).tolist()
        x = torch.from_numpy(np.stack([d[i:i + BLOCK] for i in ix]))
        y = torch.from_numpy(np.stack([d[i + 1:i + 1 + BLOCK] for i in ix]))
        return x, y

    model = GPT(len(stoi))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.99))

    @torch.no_grad()
    def val_loss():
        model.eval()
        loss = sum(model(*batch("val")).item() for _ in range(args.eval_iters)) / args.eval_iters
        model.train()
        return loss

    t0 = time.time()
    x, y = batch("train")
    for it in range(ITERS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        loss = model(x, y)
        x, y = batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"seed {args.seed}: val loss {val_loss():.4f} after {ITERS} steps "
          f"({args.eval_iters} val batches, {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
