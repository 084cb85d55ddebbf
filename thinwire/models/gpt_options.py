"""``model=gpt_char``'s options, in a module that imports no torch so that a config can be
refused without it (``thinwire.config.fast``); the network is ``thinwire.models.gpt``."""
from __future__ import annotations

import os
from dataclasses import dataclass

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
