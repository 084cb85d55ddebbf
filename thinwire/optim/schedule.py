"""Learning-rate schedule as a pure function of the step.

Being a function of the step alone (no scheduler object with hidden state) is what
makes the schedule exact after a resume: ``trainer.max_steps`` fixes it, and a run
stopped with ``trainer.stop_after`` continues on the same curve.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, max_steps: int, schedule: str = "cosine",
          warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to
    ``min_lr_ratio * lr`` at ``max_steps`` (nanoGPT's schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r}: expected constant or cosine")
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
