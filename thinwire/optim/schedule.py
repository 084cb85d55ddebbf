"""Learning-rate schedule as a pure function of the step.

Being a function of the step alone (no scheduler object with hidden state) is what
makes the schedule exact after a resume: ``trainer.max_steps`` fixes it, and a run
stopped with ``trainer.stop_after`` continues on the same curve.

``wsd`` (warm-up, stable, decay: MiniCPM, Hu et al. 2024, arXiv 2404.06395; Hägele et al.
2024, arXiv 2405.18392, who also decay for the last 20%) holds the LR constant until ``decay_start``
and decays it linearly to ``min_lr_ratio * lr`` at ``max_steps``. Because the steps before
``decay_start`` do not depend on where the run ends, one constant-LR run serves every run
length: a *decay branch* resumes its checkpoint at step ``s`` with ``optim.decay_start=s``
(at or after the checkpoint) and ``trainer.max_steps=T`` and is bitwise the run configured
with that decay from the start (``thinwire.config.resume`` allows exactly that change).
Departure from the papers: they decay to (near) zero, in linear, 1 - sqrt or exponential
shapes; here the decay is linear and ends at the same ``min_lr_ratio * lr`` as the cosine
schedule, so the two schedules end at the same LR.
"""
from __future__ import annotations

import math
from typing import Optional

SCHEDULES = ("constant", "cosine", "wsd")


def decay_start_of(max_steps: int, decay_start: Optional[int] = None, warmup_steps: int = 0) -> int:
    """The first step of ``wsd``'s decay: ``decay_start`` if set, else the step at 80% of
    ``max_steps`` (the decay is the last 20% of the run), never inside the warm-up."""
    start = (4 * max_steps) // 5 if decay_start is None else decay_start
    return max(start, warmup_steps)


def lr_at(step: int, *, lr: float, max_steps: int, schedule: str = "cosine",
          warmup_steps: int = 0, min_lr_ratio: float = 0.1, decay_start: Optional[int] = None) -> float:
    """Linear warm-up over ``warmup_steps``, then constant, cosine decay to
    ``min_lr_ratio * lr`` at ``max_steps`` (nanoGPT's schedule), or ``wsd``: constant
    until :func:`decay_start_of`, then linear to ``min_lr_ratio * lr`` at ``max_steps``
    (``decay_start >= max_steps``: no decay within the run)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    min_lr = lr * min_lr_ratio
    if schedule == "wsd":
        start = decay_start_of(max_steps, decay_start, warmup_steps)
        if step < start:
            return lr
        progress = min(1.0, (step - start) / max(1, max_steps - start))
        return lr - progress * (lr - min_lr)
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
