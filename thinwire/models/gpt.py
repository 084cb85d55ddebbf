"""A small character-level GPT (nanoGPT-shaped: pre-norm blocks, causal attention via SDPA,
tied embeddings), sized entirely from config.

``forward(x, y)`` returns the mean cross-entropy, the contract every thinwire model
follows (``loss = model(**batch)``); ``logits(x)`` and ``generate`` serve sampling.
No buffers: the causal mask comes from ``is_causal=True``, so DDP has nothing to
broadcast each step and the wire accounting stays exact.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import need, positive


TRAIN_BYTES_PER_PARAM = 16  # fp32 parameter, gradient and AdamW's two moments


def host_memory() -> int:
    """Physical memory in bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class GPTOptions:
    """``model=gpt_char``'s options (the shape of the network, vocabulary aside)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64             # context length in characters
    dropout: float = 0.0
    bias: bool = False

    def check(self) -> None:
        positive(self, "n_layer", "n_head", "n_embd", "block_size")
        need(self.n_embd % self.n_head == 0, "n_head", self.n_head, f"must divide model.n_embd={self.n_embd}")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        n = self.n_params()
        memory = host_memory()
        if memory and n * TRAIN_BYTES_PER_PARAM > memory:
            fits = (f"parameters, whose training state ({TRAIN_BYTES_PER_PARAM} bytes per parameter) exceeds "
                    f"this machine's {memory / 2**30:.0f} GiB of memory")
            if self.block_size * self.n_embd >= n / 2:  # the position table (block_size x n_embd) is most of it
                need(False, "block_size", self.block_size, f"with n_embd={self.n_embd} makes a position table of "
                     f"{self.block_size * self.n_embd:.3g} parameters (block_size x n_embd), a model of {n:.3g} {fits}")
            key = "n_layer" if self.n_layer / 4 >= self.n_embd / 128 else "n_embd"  # the one far off its default
            other = "n_embd" if key == "n_layer" else "n_layer"
            need(False, key, getattr(self, key), f"with {other}={getattr(self, other)} makes a model of {n:.3g} {fits}")

    def n_params(self, vocab_size: int = 256) -> int:
        """Parameters of the network (``vocab_size``: at most 256 characters), from its shape."""
        e = self.n_embd
        per_block = 12 * e * e + (13 * e if self.bias else 4 * e)  # qkv, proj, 4x MLP; layer norms
        return self.n_layer * per_block + (vocab_size + self.block_size) * e + 2 * e


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
