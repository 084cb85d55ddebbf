"""A small character-level GPT (nanoGPT-shaped: pre-norm blocks, causal attention via SDPA,
tied embeddings), sized entirely from config.

``forward(x, y)`` returns the mean cross-entropy, the contract every thinwire model
follows (``loss = model(**batch)``); ``logits(x)`` and ``generate`` serve sampling.
No buffers: the causal mask comes from ``is_causal=True``, so DDP has nothing to
broadcast each step and the wire accounting stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt_options import TRAIN_BYTES_PER_PARAM, GPTOptions, host_memory  # noqa: F401  (declared without torch)


@dataclass
class GPTShape(GPTOptions):
    vocab_size: int = 0              # from the data set


class CausalSelfAttention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.proj = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.n_head = s.n_head
        self.dropout = s.dropout
        self.resid_drop = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.ln1 = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.attn = CausalSelfAttention(s)
        self.ln2 = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.mlp = nn.Sequential(
            nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias), nn.GELU(),
            nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias), nn.Dropout(s.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        if s.n_embd % s.n_head:
            raise ValueError(f"model.n_embd={s.n_embd} must be divisible by model.n_head={s.n_head}")
        self.shape = s
        self.tok_emb = nn.Embedding(s.vocab_size, s.n_embd)
        self.pos_emb = nn.Embedding(s.block_size, s.n_embd)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * s.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def generate(self, x: torch.Tensor, new_tokens: int, *, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``new_tokens`` continuations; uses its own generator, never the global RNG."""
        for _ in range(new_tokens):
            logits = self.logits(x[:, -self.shape.block_size:])[:, -1, :] / temperature
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            x = torch.cat([x, nxt], dim=1)
        return x


def build_gpt(*, info, **options) -> GPT:
    """Hydra ``_target_`` of ``model=gpt_char`` (options: ``GPTOptions``); the vocabulary
    comes from the data set."""
    return GPT(GPTShape(vocab_size=info.vocab_size, **options))


build_gpt.Config = GPTOptions
build_gpt.needs_batches = ("char_windows",)  # the data sets whose ``batches`` it can train on
build_gpt.meta_buildable = True  # cheap to build on the meta device (peft checks its module names)
