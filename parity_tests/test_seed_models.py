"""The seed presets against the tutorials' own models.

Each seed's model is re-typed here from its text in ../shared/seeds/ (module
structure, names and forward as printed; sizes from the text, scaled down for
the logits). The presets must build the same parameter count at full size
(counted on the meta device, nothing allocated) and, with the tutorial's
weights copied in, the same logits in eval mode in both twins; with
seed 003's printed block (no output projection, no residual around the
feed-forward) included: no declared deviation is left.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_forward, max_diff, tokens_for, torch_forward
from torch import nn

import jaxgpt.model as jm
import torchgpt.model as tm
from gptcore.presets import load_model_config

TOL = 1e-5


# -- seed 001: MiniTransformer ----------------------------------------------------

class Seed001Attention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.n_heads, self.d_model, self.d_k = n_heads, d_model, d_model // n_heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (a.view(B, T, self.n_heads, self.d_k).transpose(1, 2)
                   for a in self.qkv_proj(x).split(self.d_model, dim=2))
        scores = (q @ k.transpose(-2, -1)) * self.d_k ** -0.5
        scores = scores.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        return self.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


class Seed001(nn.Module):
    def __init__(self, vocab_size, block_size, n_layers, n_heads, d_model, d_ff):
        super().__init__()
        self.token_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d_model), attn=Seed001Attention(d_model, n_heads), ln2=nn.LayerNorm(d_model),
            fc1=nn.Linear(d_model, d_ff, bias=False), fc2=nn.Linear(d_ff, d_model, bias=False)))
            for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.token_emb.weight = self.lm_head.weight  # tied

    def forward(self, idx):
        x = self.token_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["fc2"](F.relu(b["fc1"](b["ln2"](x))))
        return self.lm_head(self.ln_final(x))


def seed001_state(model: Seed001) -> dict:
    renames = [(r"^token_emb", "tok_emb"), (r"\.ln1\.", ".norm1."), (r"\.ln2\.", ".norm2."),
               (r"\.fc1\.", ".mlp.up."), (r"\.fc2\.", ".mlp.down."), (r"^ln_final", "norm_f")]
    return {_rename(k, renames): v for k, v in model.state_dict().items() if k != "lm_head.weight"}


# -- seed 002: TextGenerationModel ------------------------------------------------

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Seed002Attention(nn.Module):
    def __init__(self, hidden, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, hidden // n_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, n_kv_heads * self.head_dim)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = (a * cos + rotate_half(a) * sin for a in (q, k))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(hidden, intermediate), nn.Linear(hidden, intermediate),
                                         nn.Linear(intermediate, hidden))

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Seed002MoE(nn.Module):
    def __init__(self, hidden, intermediate, n_experts, top_k):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(hidden, intermediate) for _ in range(n_experts))
        self.router = nn.Linear(hidden, n_experts)
        self.top_k = top_k

    def forward(self, h):
        B, T, C = h.shape
        flat = h.reshape(-1, C)
        logits, idx = torch.topk(self.router(flat), self.top_k, dim=-1)
        probs = logits.softmax(-1)
        out = torch.zeros_like(flat)
        for e in idx.unique():
            mask = idx == e
            rows = mask.any(1)
            out[rows] += self.experts[int(e)](flat[rows]) * probs[mask].unsqueeze(-1)
        return out.view(B, T, C)


class Seed002(nn.Module):
    def __init__(self, n_layers, n_heads, n_kv_heads, hidden, n_experts, top_k, max_seq_len, vocab_size):
        super().__init__()
        dim = hidden // n_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(max_seq_len).float(), torch.cat((inv_freq, inv_freq)))
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.decoders = nn.ModuleList(nn.ModuleDict(dict(
            self_attn=Seed002Attention(hidden, n_heads, n_kv_heads),
            mlp=Seed002MoE(hidden, 4 * hidden, n_experts, top_k),
            norm1=nn.RMSNorm(hidden), norm2=nn.RMSNorm(hidden))) for _ in range(n_layers))
        self.norm = nn.RMSNorm(hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = self.cos[:T].view(1, 1, T, -1), self.sin[:T].view(1, 1, T, -1)
        x = self.embedding(ids)
        for d in self.decoders:
            x = d["self_attn"](d["norm1"](x), cos, sin) + x
            x = d["mlp"](d["norm2"](x)) + x
        return self.out(self.norm(x))


def seed002_state(model: Seed002) -> dict:
    renames = [(r"^embedding", "tok_emb"), (r"^decoders", "blocks"), (r"\.self_attn\.", ".attn."),
               (r"^norm\.", "norm_f."), (r"^out\.", "lm_head.")]
    return {_rename(k, renames): v for k, v in model.state_dict().items() if k not in ("cos", "sin")}


# -- seed 003: GPT, as printed ----------------------------------------------------

class Seed003Head(nn.Module):
    def __init__(self, embed_dim, head_size):
        super().__init__()
        self.w_key, self.w_query, self.w_value = (nn.Linear(embed_dim, head_size, bias=False) for _ in range(3))

    def forward(self, x):
        T = x.shape[1]
        k, q, v = self.w_key(x), self.w_query(x), self.w_value(x)
        scores = (q @ k.transpose(-2, -1)) / (k.size(-1) ** 0.5)
        scores = scores.masked_fill(torch.ones(T, T).triu(diagonal=1).bool(), float("-1e10"))
        return scores.softmax(-1) @ v


class Seed003(nn.Module):
    def __init__(self, num_heads, vocab_size, attention_dim, num_blocks, context_length):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, attention_dim)
        self.positional_embedding = nn.Embedding(context_length, attention_dim)
        self.decoders = nn.ModuleList(nn.ModuleDict(dict(
            heads=nn.ModuleList(Seed003Head(attention_dim, attention_dim // num_heads) for _ in range(num_heads)),
            up=nn.Linear(attention_dim, 4 * attention_dim), down=nn.Linear(4 * attention_dim, attention_dim),
            n1=nn.LayerNorm(attention_dim), n2=nn.LayerNorm(attention_dim))) for _ in range(num_blocks))
        self.exit_norm = nn.LayerNorm(attention_dim)
        self.linear = nn.Linear(attention_dim, vocab_size)

    def forward(self, context):
        e = self.embedding(context) + self.positional_embedding(torch.arange(context.shape[1]).unsqueeze(0))
        for d in self.decoders:
            x = e
            e = torch.cat([h(d["n1"](x)) for h in d["heads"]], dim=2) + x
            e = d["down"](F.gelu(d["up"](d["n2"](e))))  # no residual around the feed-forward, as printed
        return self.linear(self.exit_norm(e))


def seed003_state(model: Seed003) -> dict:
    state = model.state_dict()
    out = {}
    renames = [(r"^embedding", "tok_emb"), (r"^positional_embedding", "pos_emb"), (r"^decoders", "blocks"),
               (r"\.n1\.", ".norm1."), (r"\.n2\.", ".norm2."), (r"\.(up|down)\.", r".mlp.\1."),
               (r"^exit_norm", "norm_f"), (r"^linear", "lm_head")]
    for k, v in state.items():
        if ".heads." not in k:
            out[_rename(k, renames)] = v
    n_layers, n_heads = len(model.decoders), len(model.decoders[0]["heads"])
    for i in range(n_layers):  # the heads' projections, concatenated, are one q / k / v projection each
        for ours, theirs in (("q_proj", "w_query"), ("k_proj", "w_key"), ("v_proj", "w_value")):
            out[f"blocks.{i}.attn.{ours}.weight"] = torch.cat(
                [state[f"decoders.{i}.heads.{h}.{theirs}.weight"] for h in range(n_heads)])
    return out


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


# -- the presets, at full size and scaled down ------------------------------------

def trained_scale(model: nn.Module) -> nn.Module:
    """Weights at a trained model's scale (1/sqrt(fan_in)), norm gains and
    biases off 1 and 0, as conftest.twins does: a wrong op cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:  # 1-D weights are norm gains
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def seed001(c):
    return Seed001(c.vocab_size, c.context_length, c.n_layers, c.n_heads, c.d_model, c.d_ff)


def seed002(c):
    return Seed002(c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.n_experts, c.top_k, c.context_length,
                   c.vocab_size)


def seed003(c):
    return Seed003(c.n_heads, c.vocab_size, c.d_model, c.n_layers, c.context_length)


SEEDS = {  # preset -> (tutorial model builder, its state in our names, sizes for the logits)
    "seed001_mini": (seed001, seed001_state, dict(n_layers=2, d_model=64, d_ff=256, context_length=32)),
    "seed002_moe": (seed002, seed002_state, dict(n_layers=2, d_model=64, d_ff=256, context_length=32,
                                                vocab_size=96, n_experts=4)),
    "seed003_gpt": (seed003, seed003_state, dict(n_layers=2, d_model=64, d_ff=256, context_length=32,
                                                vocab_size=96)),
}


@pytest.mark.parametrize("name", SEEDS)
def test_preset_has_the_tutorials_parameter_count(name):
    cfg = load_model_config(name)
    build = SEEDS[name][0]
    with torch.device("meta"):
        tutorial, ours = build(cfg), tm.GPT(cfg)
    count = sum(p.numel() for p in tutorial.parameters())  # the tied head counted once, as torch does
    assert tm.count_params(ours) == count
    assert jm.count_params(jm.param_shapes(cfg)) == count


@pytest.mark.parametrize("name", SEEDS)
def test_preset_gives_the_tutorials_logits_in_both_twins(name):
    build, to_ours, sizes = SEEDS[name]
    cfg = load_model_config(name).replace(**sizes)
    torch.manual_seed(0)
    tutorial = trained_scale(build(cfg).eval())
    state = {k: v.detach().numpy() for k, v in to_ours(tutorial).items()}
    tokens = tokens_for(cfg, length=24)
    with torch.no_grad():
        expected = tutorial(torch.as_tensor(tokens).long()).numpy()
    tmodel = tm.load_state_arrays(state, cfg)
    assert max_diff(torch_forward(tmodel, tokens).logits, expected) <= TOL
    assert max_diff(jax_forward(cfg, jm.load_state_arrays(state, cfg), tokens).logits, expected) <= TOL


def test_seed003_printed_block_is_not_the_residual_one():
    """The preset that puts seed 003's residual and projection back is another
    function (a check that the logits test above can tell the two apart)."""
    build, to_ours, sizes = SEEDS["seed003_gpt"]
    cfg = load_model_config("seed003_gpt").replace(**sizes)
    fixed = load_model_config("seed003_gpt_residual").replace(**sizes)
    assert fixed.attn_out_proj and fixed.ffn_residual
    torch.manual_seed(0)
    tutorial = trained_scale(build(cfg).eval())
    tokens = tokens_for(cfg, length=24)
    with torch.no_grad():
        expected = tutorial(torch.as_tensor(tokens).long()).numpy()
    state = {k: v.detach().numpy() for k, v in to_ours(tutorial).items()}
    for i in range(fixed.n_layers):  # an identity output projection: only the missing residual differs
        state[f"blocks.{i}.attn.out_proj.weight"] = np.eye(fixed.d_model, dtype=np.float32)
    assert max_diff(torch_forward(tm.load_state_arrays(state, fixed), tokens).logits, expected) > 1e-2
