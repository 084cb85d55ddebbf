"""When a run stops, agreed by every rank: Ctrl-C, ``trainer.stop_after`` and a subclass's
``stop_early``, each after the same step on every rank, with a checkpoint of it.

Ctrl-C's request travels where the ranks already exchange something, never in a message
of its own (``progress.StopRequest`` catches the signal):

- one rank: its own request, after this step;
- ranks that agree every step (``sync=ddp``): in the step's control all-reduce, as
  :data:`STOP_WEIGHT` per requesting rank in the slot that counts non-finite ranks
  (:meth:`StopAgreement.flags` / :meth:`StopAgreement.read`): every rank reads the same sum;
- ranks that diverge between synchronisations (``sync=local|co2|...``): as a vote riding on
  the next synchronisation (``SyncStrategy.carries_stop``: :meth:`StopAgreement.vote` before
  ``global_step``, :meth:`StopAgreement.after_sync` after it);
- a plugin that agrees inside its own exchange (zeroth order, several ranks): on the periodic
  replica check's all-gather (``DriftGuard.check(stop=...)``, ``trainer.drift_check_every``),
  so every rank stops at the next check with a checkpoint, no byte per step
  (:meth:`StopAgreement.drift_vote` / :meth:`StopAgreement.after_check`); with the check
  off (``trainer.drift_check_every=0``) Ctrl-C interrupts at once and the run continues
  from its newest periodic checkpoint.
"""
from __future__ import annotations

from .progress import StopRequest

STOP_WEIGHT = 2.0 ** 20  # Ctrl-C's weight in the control packet's flag slot (> any world size)


class StopAgreement:
    """The stop decision of one worker's run. ``own_agreement``: the optimizer plugin agrees
    the step inside its own exchange (no control packet to carry a request)."""

    def __init__(self, world, sync, own_agreement: bool, max_steps: int, stop_after: int | None,
                 check_period: int = 0):
        self.world, self.sync = world, sync
        self.max_steps, self.stop_after = max_steps, stop_after
        self.last = max_steps if stop_after is None else min(max_steps, stop_after)  # the last step this process runs
        carried = not sync.ranks_diverge or sync.carries_stop
        #: zeroth order on several ranks: the request rides on the replica check
        self.on_check = own_agreement and world.world_size > 1 and check_period > 0
        together = world.world_size == 1 or (carried and not own_agreement) or self.on_check
        at_sync = world.world_size > 1 and sync.ranks_diverge
        when = ("at the next synchronisation" if at_sync else
                f"at the next replica check (every {check_period} steps: trainer.drift_check_every)"
                if self.on_check else "after this step")
        self.request = StopRequest(together, world.is_main, when)
        self.ctrl_c = False  # every rank has agreed to stop for Ctrl-C after the current step

    @property
    def requested(self) -> bool:
        return bool(self.request.requested)

    def begin_step(self) -> None:
        """With one rank, its own request stops it; with several, only a carried one does."""
        self.ctrl_c = self.world.world_size == 1 and self.requested

    def flags(self, finite: bool) -> float:
        """The control packet's flag slot: 1 if this rank's step is non-finite, plus
        :data:`STOP_WEIGHT` if it saw Ctrl-C."""
        return (0.0 if finite else 1.0) + (STOP_WEIGHT if self.requested else 0.0)

    def read(self, total: float) -> bool:
        """The summed flag slot: notes an agreed Ctrl-C; whether every rank's step was finite."""
        self.ctrl_c = total >= STOP_WEIGHT
        return int(total) % STOP_WEIGHT == 0

    def vote(self) -> None:
        """Before the sync strategy's step: its next synchronisation carries this rank's vote."""
        self.sync.stop_vote = self.requested

    def drift_vote(self) -> bool:
        """This rank's vote for the replica check's all-gather (zeroth order only)."""
        return self.on_check and self.requested

    def after_check(self, agreed: bool) -> None:
        """``agreed``: some rank voted in the check every rank just read alike."""
        self.ctrl_c = self.ctrl_c or agreed

    def after_sync(self) -> None:
        if self.sync.stop_agreed:  # every rank reads the same votes: all stop after this step
            self.ctrl_c, self.sync.stop_agreed = True, False

    @property
    def ctrl_c_now(self) -> bool:
        return self.ctrl_c or (self.world.world_size == 1 and self.requested)

    def why(self, done: int, early: bool) -> str | None:
        """Why the run ends after step ``done`` (None: it goes on); ``early``: ``stop_early`` said so."""
        if self.ctrl_c_now:
            return "Ctrl-C"
        if early or done == self.last < self.max_steps:
            return "trainer.stop_after" if done == self.stop_after else "stopped early"
        return None

    def restore(self) -> None:
        self.request.restore()
