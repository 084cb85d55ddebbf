"""Your own data set: character windows from your own text files.

The contract (docs/your_model.md): a class whose ``__init__`` takes ``batch_size`` (per
rank) and its other options as positional-or-keyword parameters, and ``seed``, ``rank``,
``world_size`` as keyword-only ones (the trainer passes them); it has ``info`` (a
``thinwire.data.base.DataInfo``), ``train_batch(step)`` (a dict of tensors, a pure function
of seed, rank and step, so that a resumed run draws the batches the uninterrupted one would)
and ``eval_batches_for_rank()`` (this rank's share of fixed validation batches).
"""
from __future__ import annotations

import glob
import os

import torch

from thinwire.data.base import EVAL, TRAIN, DataInfo, shard_bounds, step_generator


class TextFiles:
    """Every ``*.txt`` under ``path``, as one character stream: the last ``val_fraction`` is
    held out; a batch is ``batch_size`` random windows, ``x`` = window[:-1], ``y`` = window[1:]."""

    batches = "char_windows"  # the batches thinwire's char-GPT (model=gpt_char) trains on

    def __init__(self, path: str, batch_size: int = 16, block_size: int = 64, val_fraction: float = 0.1,
                 eval_batches: int = 4, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise FileNotFoundError(f"data.path={path}: no *.txt files there")
        text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
        self.chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1 - val_fraction))
        self.train, self.val = ids[:cut], ids[cut:]
        if len(self.val) <= block_size + 1:
            raise ValueError(f"data.block_size={block_size}: longer than the held-out text ({len(self.val)} chars)")
        lo, hi = shard_bounds(len(self.train), rank, world_size)
        self.shard = self.train[lo:hi]
        self.batch_size, self.block_size, self.eval_batches = batch_size, block_size, eval_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.info = DataInfo(unit="tokens", items_per_batch=batch_size * block_size, vocab_size=len(self.chars),
                             decode=lambda ids: "".join(self.chars[i] for i in ids),
                             encode=lambda s: [stoi[c] for c in s if c in stoi])

    def _windows(self, data: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(data) - self.block_size - 1, (self.batch_size,), generator=gen)
        w = data[starts[:, None] + torch.arange(self.block_size + 1)]
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self._windows(self.shard, step_generator(self.seed, TRAIN, self.rank, step))

    def eval_batches_for_rank(self):
        for i in range(self.rank, self.eval_batches, self.world_size):
            yield self._windows(self.val, step_generator(self.seed, EVAL, i))
