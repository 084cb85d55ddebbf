"""Tensor trees: checkpoint state as nested dicts, lists and tuples of tensors."""
from __future__ import annotations

import torch


def on_device(state, device: torch.device):
    """``state`` (nested dicts, lists, tuples) with its tensors moved to ``device``: files load
    to the CPU, and per-rank state that is used as it is read (error-feedback buffers, a
    fragment's mean, two-phase server errors) must live where the gradients are. Tensors under
    a key ``step`` stay put (torch optimizers keep their step counters on the CPU and place
    the rest themselves)."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: v if k == "step" else on_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_device(v, device) for v in state)
    return state


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (FSDP2), else ``t`` itself.
    Writes into it in place reach the DTensor."""
    return t.to_local() if hasattr(t, "to_local") else t
