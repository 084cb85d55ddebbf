"""Fault injection for reliability tests and drills (``trainer.faults.*``).

Faults fire only in the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT``
is 0), so a restarted job runs clean and can be compared with an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time

import torch

from .fault_config import FaultConfig  # noqa: F401  (declared without torch: the config path reads it)


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
        if getattr(self.cfg, "step_sleep_s", 0):  # drill pacing: slow survivors let a restarted slot rejoin
            time.sleep(self.cfg.step_sleep_s)
        if not self.active:
            return
        if self.cfg.error_at == step:
            raise InjectedFault(f"trainer.faults.error_at={step}: injected error on rank {self.cfg.rank}")
        if self.cfg.kill_at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.stop_at == step:
            print(f"thinwire: fault: rank {self.cfg.rank} stops (SIGSTOP) after step {step} at "
                  f"t={time.time():.3f}", flush=True)
            if getattr(self.cfg, "stop_for_s", 0):  # a late peer rather than a hung one: continued later
                subprocess.Popen(["sh", "-c", f"sleep {self.cfg.stop_for_s}; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
