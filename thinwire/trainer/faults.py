"""Fault injection for reliability tests and drills (``trainer.faults.*``).

Faults fire only in the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT``
is 0), so a restarted job runs clean and can be compared with an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import need


@dataclass
class FaultConfig:
    """``trainer.faults``: all off by default. A fault fires once, on ``rank``, after step
    ``*_at`` completes (nan: during that step's backward; ckpt_fail: during that step's
    checkpoint write), and only in the first attempt of an elastic job (restarts run clean;
    ``nan_in_restarts``: nan_at in restarts too)."""
    rank: int = 0
    nan_at: Optional[int] = None     # poison this rank's gradients in that step
    kill_at: Optional[int] = None    # SIGKILL this rank after that step
    stop_at: Optional[int] = None    # SIGSTOP this rank after that step (a hung peer)
    error_at: Optional[int] = None   # raise an error on this rank after that step (one rank fails alone)
    drift_at: Optional[int] = None   # change this rank's consensus state by one ulp after that step
    ckpt_fail_at: Optional[int] = None  # this rank's checkpoint write of that step fails (no space left)
    nan_in_restarts: bool = False    # nan_at fires in restarts too (a bad batch recurs whenever its step is redone)
    # a planned absence, "SLOT:FIRST..LAST": slot SLOT takes no part in outer rounds FIRST..LAST (0-based;
    # sync=local|diloco; thinwire/elastic/absence.py); unlike the faults above it fires in every attempt
    absent_at: Optional[str] = None

    def check(self) -> None:
        need(0 <= self.rank < 1_000_000, "faults.rank", self.rank, "must be >= 0")
        for k in ("nan_at", "kill_at", "stop_at", "error_at", "drift_at", "ckpt_fail_at"):
            v = getattr(self, k)
            need(v is None or v > 0, f"faults.{k}", v, "must be a positive step or null")
        if self.absent_at is not None:
            from ..elastic.absence import parse
            parse(self.absent_at, "faults.absent_at")


class InjectedFault(RuntimeError):
    """``faults.error_at``: what any unexpected error on one rank looks like to the job."""


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class FaultInjector:
    def __init__(self, cfg, rank: int):
        self.cfg = cfg
        self.active = rank == cfg.rank and restart_count() == 0
        self.nan_active = rank == cfg.rank and (restart_count() == 0 or bool(getattr(cfg, "nan_in_restarts", False)))

    @contextlib.contextmanager
    def poison_gradients(self, model: torch.nn.Module, step: int, backprop: bool = True):
        """During step ``nan_at``: this rank's gradients become NaN before they are sent
        (a tensor hook runs before DDP's reducer sees the gradient); without backprop
        (zeroth order: the gradient estimate is a difference of losses) its losses do."""
        if not (self.nan_active and self.cfg.nan_at == step):
            yield
            return
        if backprop:
            handles = [p.register_hook(lambda g: torch.full_like(g, float("nan")))
                       for p in model.parameters() if p.requires_grad]
        else:
            handles = [model.register_forward_hook(lambda module, args, out: out * float("nan"))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def checkpoint_write_error(self, step: int) -> Optional[OSError]:
        """At step ``ckpt_fail_at``: the error this rank's checkpoint write meets, raised inside
        the atomic writer (``thinwire.trainer.checkpoint``) as a full disk would (ENOSPC)."""
        if self.active and getattr(self.cfg, "ckpt_fail_at", None) == step:
            return OSError(errno.ENOSPC, f"No space left on device (injected: trainer.faults.ckpt_fail_at={step})")
        return None

    @torch.no_grad()
    def corrupt(self, state: dict, step: int) -> None:
        """At step ``drift_at``, just before the replica-drift guard's check: move the first
        element of this rank's first consensus tensor to the next float (one ulp), the
        smallest silent divergence there is."""
        if self.active and self.cfg.drift_at == step and state:
            x = next(iter(state.values())).view(-1)[:1]
            x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))

    def after_step(self, step: int) -> None:
        if not self.active:
            return
        if self.cfg.error_at == step:
            raise InjectedFault(f"trainer.faults.error_at={step}: injected error on rank {self.cfg.rank}")
        if self.cfg.kill_at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.stop_at == step:
            print(f"thinwire: fault: rank {self.cfg.rank} stops (SIGSTOP) after step {step} at "
                  f"t={time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
