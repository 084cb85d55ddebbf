"""``trainer.faults``' options, in a module that imports no torch so that a config can be
refused without it (``thinwire.config.fast``); the injection itself is ``thinwire.trainer.faults``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    # elastic=torchft: SIGKILL slot ``rank`` inside outer round ROUND's collective (0-based; first attempt only)
    kill_in_collective_at: Optional[int] = None
    stop_for_s: float = 0.0          # stop_at: a helper sends SIGCONT after this many seconds (0: stopped for good)
    step_sleep_s: float = 0.0        # every rank (slot) sleeps this long after each step, in every attempt (drill pacing)
    # elastic=torchft drill pacing: before outer round ROUND every other slot waits (up to elastic.quorum_timeout_s)
    # until slot ``rank``'s restarted process is up, so that it rejoins whatever the machine's start-up time
    rejoin_wait_at: Optional[int] = None

    def check(self) -> None:
        need(0 <= self.rank < 1_000_000, "faults.rank", self.rank, "must be >= 0")
        for k in ("nan_at", "kill_at", "stop_at", "error_at", "drift_at", "ckpt_fail_at"):
            v = getattr(self, k)
            need(v is None or v > 0, f"faults.{k}", v, "must be a positive step or null")
        need(self.stop_for_s >= 0, "faults.stop_for_s", self.stop_for_s, "must be >= 0 (seconds; 0: stopped for good)")
        need(self.step_sleep_s >= 0, "faults.step_sleep_s", self.step_sleep_s, "must be >= 0 (seconds)")
        need(self.kill_in_collective_at is None or self.kill_in_collective_at >= 0, "faults.kill_in_collective_at",
             self.kill_in_collective_at, "must be an outer round (>= 0) or null")
        need(self.rejoin_wait_at is None or self.rejoin_wait_at > 0, "faults.rejoin_wait_at", self.rejoin_wait_at,
             "must be an outer round (> 0) or null")
        if self.absent_at is not None:
            from ..elastic.absence import parse
            parse(self.absent_at, "faults.absent_at")
