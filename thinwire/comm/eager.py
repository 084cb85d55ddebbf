"""Eager updates (``sync=co2 sync.overlap=eager``; Kale, Douillard, Donchev 2025, "Eager
updates for overlapped communication and computation in DiLoCo", arXiv 2502.12996).

Index convention, the paper's: outer step t follows the inner steps of round t, which
produce Delta_m^(t); the all-reduce of Delta^(t) = mean_m Delta_m^(t) is launched at the end
of round t and arrives during round t+1. The paper's eager outer gradient at step t is

    Dtilde_m^(t) = Delta_m^(t) / M + sum_{m' != m} Delta_{m'}^(t-1) / M

(own fresh share, the others' one round old), applied by worker m's outer optimizer to
its own parameters. Unrolled, every contribution is applied once (own at its round, the
others' one round later), so worker m's anchor is the consensus of the means up to t-1
plus its own fresh share. That is how it is computed here, at the end of round t on
rank i::

    c_{t-1} = OuterOpt(c_{t-2}, Delta^(t-1))      consensus: all-reduced means only, its own state
    Delta_i^(t) = a_i - w_i                       from where this rank's round began
    launch the all-reduce of Delta_i^(t)
    a_i = OuterOpt'(c_{t-1}, Delta_i^(t) / p);  w_i = a_i      OuterOpt': a copy of c's state

so a_i differs from the consensus by its own fresh term passed through the outer
optimizer (with SGD lr 1 and no momentum, exactly the paper's unrolled update). With
momentum the paper keeps one outer optimizer per worker fed with Dtilde; here the
optimizer state is the consensus's, fed with means only, and identical on every rank
(the issue's design: the per-rank part is only the fresh term). The model evaluated,
sampled from and compared across ranks is c after the mean in flight is waited for and
applied: at the run's end c_T includes round T's mean (the last round finishes
synchronously; its bytes were counted at launch, like every round's). No staleness
penalty and no outer clip by default (the paper has neither; ``staleness_penalty > 0``
is rejected, ``clip`` may be set). The checkpoint holds c, its optimizer state and a_i;
a mean in flight is first waited for and applied to c, which changes only timing, never
values (the same holds for an evaluation mid-round). p is the number of replicas
averaged (the cross group's size under ZeRO replica groups).

The consensus c is the strategy's anchor; the in-flight average (launch, wait, and the
consensus step on each mean as soon as it is waited for) is CO2's (``thinwire.comm.co2``).
"""
from __future__ import annotations

import contextlib
import time

from . import accounting


class EagerUpdates:
    """The eager form's own steps, mixed into ``thinwire.comm.co2.CO2`` (which calls them when
    ``sync.overlap=eager``). Uses the host's space, anchor, outer optimizer, averager,
    ``_launch``/``_complete`` (the in-flight average), ``round``, ``skipped``, ``moments``,
    ``finite_everywhere`` and ``metrics``."""

    def init_eager(self, world) -> None:
        self.start = self.space.read_flat()        # this rank's own anchor a_i: where its round began
        self.replicas_n = accounting.group_size(self.averager.group) if world.world_size > 1 else 1

    def eager_step(self) -> dict[str, float]:
        """End of round t under ``overlap=eager`` (see the module doc)."""
        consume_s = time.perf_counter()
        out: dict[str, float] = {}
        in_flight = self.future is not None
        wait = self._complete()                            # c_{t-1} = OuterOpt(c_{t-2}, Delta^{t-1})
        if in_flight and self.done_s and self.launched_s:
            hidden = max(0.0, min(self.done_s, consume_s) - self.launched_s)
            out["overlap_fraction"] = min(1.0, hidden / max(self.done_s - self.launched_s, 1e-9))
        t0 = time.perf_counter()
        live = self.space.read_flat()
        delta = self.start - live                          # Delta_i^t
        self.round += 1
        self.moments.after_round(self.round)
        if not self.finite_everywhere(delta):
            self.space.write_flat(self.start)              # restart the round from this rank's own anchor
            self.skipped += 1
            return self.metrics(wait + time.perf_counter() - t0, **out)
        self._launch(delta.clone())
        # the others' one-round-old contributions are in c (Delta^{t-1}); this rank's fresh share steps from it
        self.start = self.space.flat(self.outer.trial(self.space.split(delta.div(self.replicas_n))))
        self.space.write_flat(self.start)
        wait += time.perf_counter() - t0
        return self.metrics(wait, **out, **self.averager.take_stats())

    @contextlib.contextmanager
    def consensus_model(self):
        """The consensus anchor, after the mean in flight is waited for and applied (the same
        on every rank), swapped in for the duration."""
        self._complete()
        live = self.space.read_flat()
        self.space.write_flat(self.space.flat(self.anchor))
        try:
            yield self.model
        finally:
            self.space.write_flat(live)
