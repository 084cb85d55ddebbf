"""``optim=demo optim.overlap=true``: the look-ahead overlap of Psyche's DisTrO
(``PsycheFoundation/psyche``: ``shared/modeling/src/distro.rs``, ``Distro::error_correction`` /
``generate`` / ``apply``, driven by ``shared/modeling/src/trainer.rs``).

Without overlap, step t waits for the all-gather of its own payloads before it can step. With
it, step t's gather runs on the world's second process group while step t + 1 computes, and
the update it carries lands one step late. What is applied when, on every rank (x the
parameters, identical on every rank at every step boundary; m_t this rank's momentum after
step t's gradient and before its sent coefficients leave it; U_t the decoded mean of step t's
gather; eta_t the LR of step t)::

    step t + 1, compute:  x' = x - eta_t sign(m_t)           this rank's look-ahead (its own guess of
                          loss, g_{t+1} at x'                 the update still in flight), then
                          x restored exactly                  x back from a copy (bitwise)
    step t + 1, apply:    wait for U_t (hidden behind the forward/backward above)
                          x <- x (1 - eta_t wd) - eta_t sign(U_t)      the correction: the real update
                          m, payload of step t + 1 from g_{t+1}; launch its gather
    last step (max_steps - 1): wait for its own gather and apply it at once (nothing is left to
                          overlap with), so the final model holds every update.

So x after step t holds U_0 .. U_{t-1}; the gradient of step t + 1 is taken at x - eta_t
sign(m_t), which stands in for the missing x - eta_t sign(U_t). Departures from Psyche, and
why: Psyche keeps the look-ahead in the live weights between steps and removes it by adding it
back (``variable += prev_lr sign(delta)``), which is not bitwise reversible in floating point, so
ranks would drift apart; here the look-ahead is applied around the forward/backward only and
the parameters are restored from a copy, so the parameters evaluated, checkpointed and checked
by the drift guard are the consensus x (one update behind the gather in flight). The direction
is kept as int8 signs (one byte per parameter), plus one parameter-sized copy during compute.

A checkpoint written while a gather is in flight first waits for it and stores the decoded
U_t (and eta_t); the resumed run applies that U_t at the next step exactly as the uninterrupted
run does (waiting early changes only timing). A skipped (non-finite) step leaves the gather in
flight and the look-ahead as they are; the next accepted step consumes them.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch


class Gather:
    """One step's all-gather: the payload templates, the packed sizes, the receive buffer,
    the work handle (None when it ran synchronously) and its launch / completion times."""

    def __init__(self, payloads: list, sizes: list[int], gathered: torch.Tensor, started: float):
        self.payloads, self.sizes, self.gathered, self.started = payloads, sizes, gathered, started
        self.work = None
        self.done_at: Optional[float] = None

    def mark_done(self, fut):
        """Future callback (on the comm thread): when the gathered bytes arrived."""
        self.done_at = time.perf_counter()
        return None


class Lookahead:
    """The per-rank look-ahead direction and the update in flight (module docstring)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.direction = [torch.zeros_like(p, dtype=torch.int8) for p in params]  # sign(m_t)
        self.saved = [torch.empty_like(p) for p in params]
        self.lr = 0.0                # eta_t of the direction; 0 before the first step
        self.pending = None          # Gather in flight, or its decoded U (list) after a checkpoint
        self.pending_lr = 0.0

    @contextlib.contextmanager
    def applied(self):
        """x - eta_t sign(m_t) while the body runs; x restored bitwise afterwards."""
        if self.lr == 0.0:
            yield
            return
        with torch.no_grad():
            for p, s, d in zip(self.params, self.saved, self.direction):
                s.copy_(p)
                p.sub_(d.to(p.dtype), alpha=self.lr)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, self.saved):
                    p.copy_(s)

    def launch(self, gather: Gather, lr: float) -> None:
        """Step t's gather is in flight; its look-ahead (``direction``, set by the caller) uses eta_t."""
        self.pending, self.pending_lr, self.lr = gather, lr, lr

    def take(self, finish: Callable[[Gather], list]) -> list[torch.Tensor]:
        """The update in flight, decoded (waiting for it if needed); nothing is pending after."""
        u = self.pending if isinstance(self.pending, list) else finish(self.pending)
        self.pending = None
        return u

    def state_dict(self, names: list[str], finish: Callable[[Gather], list]) -> dict:
        if isinstance(self.pending, Gather):
            self.pending = finish(self.pending)    # waits: only timing changes, never values
        return {"direction": {n: d.clone() for n, d in zip(names, self.direction)}, "lr": self.lr,
                "pending": None if self.pending is None else {n: u.clone() for n, u in zip(names, self.pending)},
                "pending_lr": self.pending_lr}

    def load_state_dict(self, state: dict, names: list[str]) -> None:
        for n, d in zip(names, self.direction):
            d.copy_(state["direction"][n])
        self.lr, self.pending_lr = float(state["lr"]), float(state["pending_lr"])
        self.pending = None if state["pending"] is None else \
            [state["pending"][n].to(d.device, copy=True) for n, d in zip(names, self.direction)]
