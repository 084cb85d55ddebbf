"""The network clock's model: the time of one round (H steps) of a data-parallel method from
its collective calls, a link model and a compute time. The projections are in
bench/harness/netclock_project.py, the CLI in bench/netclock.py.

The model (issue "time to quality at the scale users run")::

    call time      t(c) = latency x hops(c) + per_call(c) + bytes(c) / (bandwidth x goodput(c))
    hops           the sequential message rounds of the collective's standard algorithm
                   (thinwire/comm/accounting.py's table; the latency terms of Thakur,
                   Rabenseifner and Gropp 2005, "Optimization of collective communication
                   operations in MPICH"): ring all-reduce 2(p-1), ring all-gather /
                   reduce-scatter p-1, pairwise all-to-all p-1, pipelined broadcast p-1
    bytes(c)       bytes one rank sends in c, as thinwire's accounting charges them
                   (``collective_bytes``; all-gather grows with p-1)
    round time     H x compute + codec + exposed network        (a round = H steps; H = 1 for DDP)
                   + H x exposed island traffic                  (FSDP2 inside a replica, below)
    step time      round time / H

``per_call`` is zero and ``goodput`` one in projections (latency is modelled, the preset's
bandwidth is taken as payload bandwidth); on the shaped network both are fitted per collective
kind from ``bench/cluster_peer_probe.py`` (4-byte and 64 KiB calls on the same links), where tc
cannot add delay (bench/netclock_validate.py).

Overlap rules, per mode (what "exposed" means):

- ``ddp``: DDP buckets become ready one by one during backward (backward = 2/3 of compute,
  bucket i of B ready at i/B of it, equal buckets) and go out one after another on the one
  link: ``f_i = max(f_{i-1}, ready_i) + t(bucket i)``; exposed = ``f_B - backward`` (the
  tail after backward; one bucket: all of it). Control calls (thinwire's per-step loss and
  non-finite all-reduce) come after backward and are exposed.
- ``local`` (local SGD / DiLoCo / SparseLoCo / PostLocalSGD): every call blocks at the end
  of the round: exposed = sum t(c).
- ``overlap`` (CO2, Sun et al. 2024, arXiv 2401.16265, Alg. 1; eager updates, Kale et al.
  2025, arXiv 2502.12996): the round's outer all-reduce runs during the next round's H steps
  of compute: exposed = max(0, t(data) - H x compute); control calls block.
- ``streaming`` (Streaming DiLoCo, arXiv 2501.18512, Alg. 1): F fragments of ~N/F values,
  one every H/F steps, each overlapping tau inner steps (tau < H/F: at most one in flight):
  exposed = sum_j max(0, t(fragment j) - tau x compute).

Inside an island (``engine=fsdp2``: a replica of S GPUs, its own fast link, ``island_exposed``),
FSDP2 all-gathers each unit's parameters in forward and again in backward and reduce-scatters
its gradient, every step, whatever the sync mode. It prefetches: the first unit's all-gather
is exposed (nothing computes before it), the rest of forward's gathers overlap the forward
(1/3 of compute) and backward's gathers and reduce-scatters the backward (2/3); what does not
fit is exposed. Departure: overlap is credited in aggregate, not unit by unit.

Codec (compress + decompress) time is added serially: it runs on the same device as
compute (a GPU's copy engine is not modelled), so it is never hidden. In projections it is
bytes touched / (device copy bandwidth x pass efficiency), never the CPU's time.
Departures: no congestion between concurrent calls (the link is serial, and overlapped
traffic gets the full link), no NCCL channel pipelining across buckets (each bucket pays
its latency x hops: pessimistic for DDP at high latency, as the issue prescribes), no
straggler or failure time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

SYNC_MODES = ("ddp", "local", "overlap", "streaming")
BACKWARD_FRACTION = 2 / 3   # backward ~ 2x forward (6N flops per token: 2N forward, 4N backward)


def hops(collective: str, p: int) -> int:
    """Sequential message rounds of the collective's standard algorithm over p ranks."""
    if p <= 1:
        return 0
    if collective == "all_reduce":
        return 2 * (p - 1)
    if collective in ("all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        return p - 1
    raise ValueError(f"collective={collective!r}: expected all_reduce, all_gather, reduce_scatter, "
                     f"all_to_all or broadcast")


@dataclass(frozen=True)
class Call:
    """One collective call as the accounting logged it: ``nbytes`` this rank sends."""
    collective: str
    kind: str       # data | control | island (thinwire.comm.accounting.KINDS)
    nbytes: int
    p: int

    @property
    def messages(self) -> int:
        return hops(self.collective, self.p)


@dataclass(frozen=True)
class Link:
    """One rank's link: ``gbit`` (10^9 bit/s, each direction), ``latency_s`` per message,
    ``per_call_s``: a fitted fixed cost per call by collective (software, handshakes), and
    ``goodput``: the fraction of ``gbit`` a collective's payload gets (headers, ACKs, TCP
    over a shaper), fitted by collective; 1 where not given (projections)."""
    gbit: float
    latency_s: float = 0.0
    per_call_s: Mapping[str, float] = field(default_factory=dict)
    goodput: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.gbit > 0:
            raise ValueError(f"gbit={self.gbit!r}: must be > 0")
        if self.latency_s < 0:
            raise ValueError(f"latency_s={self.latency_s!r}: must be >= 0")

    def latency_part(self, c: Call) -> float:
        return self.latency_s * c.messages + self.per_call_s.get(c.collective, 0.0)

    def bandwidth_part(self, c: Call) -> float:
        return c.nbytes * 8 / (self.gbit * 1e9 * self.goodput.get(c.collective, 1.0))

    def time(self, c: Call) -> float:
        return self.latency_part(c) + self.bandwidth_part(c)

    def total(self, calls: Iterable[Call]) -> float:
        return sum(self.time(c) for c in calls)


def ddp_exposed(bucket_s: Sequence[float], backward_s: float) -> float:
    """Network time left after backward when bucket i (of B) is ready at (i+1)/B of backward
    and buckets go out one after another: ``f_i = max(f_{i-1}, ready_i) + t_i``."""
    f, B = 0.0, len(bucket_s)
    for i, t in enumerate(bucket_s):
        f = max(f, backward_s * (i + 1) / B) + t
    return max(0.0, f - backward_s) if B else 0.0


def island_exposed(link: Link, forward: Sequence[Call], backward: Sequence[Call], compute_s: float) -> float:
    """Seconds per step that FSDP2's traffic inside an island adds to the step (module
    docstring): ``forward``: the units' all-gathers in forward order; ``backward``: backward's
    all-gathers and reduce-scatters; on the island's ``link``. Nothing inside: 0."""
    if not forward and not backward:
        return 0.0
    forward_s = (1 - BACKWARD_FRACTION) * compute_s
    first = link.time(forward[0]) if forward else 0.0
    rest = link.total(forward[1:])
    return first + max(0.0, rest - forward_s) + max(0.0, link.total(backward) - BACKWARD_FRACTION * compute_s)


@dataclass(frozen=True)
class RoundTime:
    """One round (H steps) on the clock: compute, codec, the network time of all its calls,
    the part of it that is exposed, and the part of that which is latency; ``island_s``: the
    exposed traffic inside the island over the round (``island_exposed`` x H)."""
    H: int
    compute_s: float
    codec_s: float
    network_s: float
    exposed_s: float
    latency_s: float
    island_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.H * self.compute_s + self.codec_s + self.exposed_s + self.island_s

    @property
    def step_s(self) -> float:
        return self.total_s / self.H

    @property
    def utilisation(self) -> float:
        """Compute time / step time (the issue's step-time utilisation)."""
        return self.H * self.compute_s / self.total_s


def round_time(sync: str, link: Link, compute_s: float, data: Sequence[Sequence[Call]],
               control: Sequence[Call] = (), H: int = 1, tau: int = 0, codec_s: float = 0.0,
               island_s: float = 0.0) -> RoundTime:
    """Time of one round under ``sync``'s overlap rule (module docstring). ``data``: the round's
    data calls grouped into units that travel together (DDP: buckets; streaming: fragments;
    local/overlap: usually one group), ``control``: blocking small calls; ``island_s``: the
    exposed island traffic of one step (``island_exposed``)."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync={sync!r}: expected one of {', '.join(SYNC_MODES)}")
    if H < 1 or compute_s < 0 or codec_s < 0:
        raise ValueError(f"H={H!r}, compute_s={compute_s!r}, codec_s={codec_s!r}: need H >= 1, times >= 0")
    if sync == "ddp" and H != 1:
        raise ValueError(f"H={H!r}: sync=ddp synchronises every step (H = 1)")
    if sync == "streaming" and (H % max(1, len(data)) or not 0 <= tau < H // max(1, len(data))):
        raise ValueError(f"tau={tau!r}: must be in [0, H/F) with F dividing H (H={H}, F={len(data)})")
    groups = [link.total(g) for g in data]
    ctrl = link.total(control)
    if sync == "ddp":
        exposed = ddp_exposed(groups, BACKWARD_FRACTION * compute_s)
    elif sync == "local":
        exposed = sum(groups)
    elif sync == "overlap":
        exposed = max(0.0, sum(groups) - H * compute_s)
    else:
        exposed = sum(max(0.0, g - tau * compute_s) for g in groups)
    calls = [c for g in data for c in g] + list(control)
    return RoundTime(H, compute_s, codec_s, sum(groups) + ctrl, exposed + ctrl,
                     sum(link.latency_part(c) for c in calls), H * island_s)
