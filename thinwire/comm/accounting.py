"""Wire-byte accounting: every collective thinwire issues goes through this module.

Each wrapper calls the torch.distributed collective and charges the bytes *this rank
sends* under the standard algorithm of that collective (what NCCL and gloo implement
for large messages), with n the element count of the local input and b its element
size, p the group size:

=================  ==========================================  ============================
collective         algorithm                                    bytes sent per rank
=================  ==========================================  ============================
all_reduce         ring: reduce-scatter + all-gather            2 (p-1)/p * n * b
all_gather         ring; each rank contributes n elements       (p-1) * n * b
reduce_scatter     ring; n = the full (unscattered) input       (p-1)/p * n * b
all_to_all         direct; n = the full input, p equal chunks   (p-1)/p * n * b
broadcast          pipelined ring/tree, averaged over ranks     (p-1)/p * n * b
=================  ==========================================  ============================

With p == 1 nothing crosses the wire and every formula gives 0.  Control traffic
(non-finite flags, metric reductions) goes through the same wrappers with
``kind="control"`` so it is counted too; setup traffic (DDP's initial parameter
broadcast) is charged with ``kind="setup"`` and kept out of the per-step totals, and
evaluation traffic with ``kind="eval"``, reported as ``eval_bytes``, never in ``wire_bytes``.
Traffic inside an FSDP2 island (``kind="island"``: the all-gathers and reduce-scatters of
``engine=fsdp2`` over the fast links between the ranks that shard one replica) is reported
as ``island_bytes``, never in ``wire_bytes`` (the links between replicas). FSDP2's own
collectives do not pass through these wrappers: the engine *accounts* them per step from the
sharded parameters' sizes and dtypes with the same formulas
(``thinwire.trainer.fsdp2_engine.island_step_bytes``); they are not measured.

``dense_bytes`` is the reference every report compares against: what an fp32 ring
all-reduce of ``numel`` gradient elements would have sent, 2 (p-1)/p * numel * 4.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .futures import hold


def collective_bytes(kind: str, numel: int, element_size: int, world_size: int) -> int:
    """Bytes sent per rank by collective ``kind`` (see the module table): the one byte
    formula; :func:`allreduce_bytes` is its all-reduce for a dtype."""
    p = world_size
    if p <= 1:
        return 0
    n_bytes = numel * element_size
    if kind == "all_reduce":
        return int(round(2 * (p - 1) / p * numel * element_size))
    if kind == "all_gather":
        return (p - 1) * n_bytes
    if kind in ("reduce_scatter", "all_to_all", "broadcast"):
        return int(round((p - 1) / p * n_bytes))
    raise ValueError(f"unknown collective kind {kind!r}")


KINDS = ("data", "control", "setup", "eval", "island")


@dataclass(frozen=True)
class ByteCounts:
    """Bytes this rank sent, by traffic kind (the module docstring's kinds): ``data`` (gradients,
    pseudo-gradients, projected gradients), ``control`` (non-finite flags, loss reductions),
    ``setup`` (once per run: DDP's initial broadcast, LoRA-GA's estimate, a resume's checks),
    ``eval`` (evaluation), ``island`` (inside an FSDP2 island: accounted all-gathers and
    reduce-scatters), ``other`` (kinds a third-party part invented). ``wire`` is what the
    trainer reports as ``wire_bytes``: every kind but setup, eval and island."""
    data: int = 0
    control: int = 0
    setup: int = 0
    eval: int = 0
    island: int = 0
    other: int = 0

    @property
    def wire(self) -> int:
        return self.data + self.control + self.other

    @classmethod
    def of(cls, by_kind: dict) -> "ByteCounts":
        known = {k: int(by_kind.get(k, 0)) for k in KINDS}
        return cls(**known, other=sum(int(v) for k, v in by_kind.items() if k not in KINDS))

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        """Flat ``{prefix}data_bytes``, ..., ``{prefix}wire_bytes``: for a logger."""
        out = {f"{prefix}{k}_bytes": getattr(self, k) for k in (*KINDS, "other")}
        out[f"{prefix}wire_bytes"] = self.wire
        return out


def allreduce_bytes(numel: int, world_size: int, dtype: torch.dtype = torch.float32) -> int:
    """The reference a byte count is compared with: what one ring all-reduce of ``numel``
    elements of ``dtype`` sends per rank (fp32: the trainer's ``dense_bytes``; bf16: the
    reference of the project's byte claims)."""
    return collective_bytes("all_reduce", numel, torch.empty((), dtype=dtype).element_size(), world_size)


def __getattr__(name: str):
    """Earlier names of the same formula, kept for a release (``DeprecationWarning``)."""
    import warnings

    old = {"ring_allreduce_bytes": ("collective_bytes('all_reduce', numel, element_size, world_size)",
                                    lambda numel, element_size, world_size:
                                    collective_bytes("all_reduce", numel, element_size, world_size)),
           "dense_reference_bytes": ("allreduce_bytes(numel, world_size)", allreduce_bytes)}
    if name in old:
        warnings.warn(f"thinwire.comm.accounting.{name} is deprecated: use {old[name][0]}", DeprecationWarning,
                      stacklevel=2)
        return old[name][1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WireMeter:
    """Per-rank counters of bytes sent, split by traffic kind, reset every step.

    ``take()`` (typed, :class:`ByteCounts`; ``take_step()`` the same as a dict) returns and
    clears the counters since the last take; ``total()`` / ``totals`` accumulate over the whole
    run (and are checkpointed). Setting ``log = []`` records every charge as
    ``(collective, kind, nbytes, group size)`` (collective "" where the caller did not name
    it): the per-call input of the network clock, ``bench/harness/netclock_model.py``.
    """

    def __init__(self) -> None:
        self.step_bytes: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = defaultdict(int)
        self.calls = 0
        self.log: list | None = None

    def charge(self, nbytes: int, kind: str = "data", collective: str = "", group_size: int = 0) -> None:
        self.step_bytes[kind] += int(nbytes)
        self.totals[kind] += int(nbytes)
        self.calls += 1
        if self.log is not None:
            self.log.append((collective, kind, int(nbytes), group_size))

    def take_step(self) -> dict[str, int]:
        out = dict(self.step_bytes)
        self.step_bytes.clear()
        return out

    def take(self) -> ByteCounts:
        """Bytes sent since the last ``take``/``take_step``, and reset."""
        return ByteCounts.of(self.take_step())

    def total(self) -> ByteCounts:
        """Bytes sent since the meter was created (or since the totals it was loaded with)."""
        return ByteCounts.of(self.totals)

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.totals = defaultdict(int, state.get("totals", {}))


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _local_only() -> bool:
    """No process group (library use of a collective in a single process): nothing to send."""
    return not dist.is_initialized()


def all_reduce(meter: WireMeter, tensor: torch.Tensor, *, group=None, op=dist.ReduceOp.SUM,
               async_op: bool = False, kind: str = "data"):
    """``dist.all_reduce`` charged as a ring all-reduce."""
    p = group_size(group)
    meter.charge(collective_bytes("all_reduce", tensor.numel(), tensor.element_size(), p), kind, "all_reduce", p)
    if _local_only():
        return _done(tensor) if async_op else None
    return _held(dist.all_reduce(tensor, op=op, group=group, async_op=async_op))


def all_gather_into(meter: WireMeter, output: torch.Tensor, tensor: torch.Tensor, *, group=None,
                    async_op: bool = False, kind: str = "data"):
    """Gather equal-sized 1-D ``tensor`` from every rank into flat ``output`` (p * n)."""
    p = group_size(group)
    meter.charge(collective_bytes("all_gather", tensor.numel(), tensor.element_size(), p), kind, "all_gather", p)
    if _local_only():
        output.copy_(tensor.reshape(-1))
        return _done(output) if async_op else None
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    return _held(gather(output, tensor.reshape(-1), group=group, async_op=async_op))


def all_to_all_single(meter: WireMeter, output: torch.Tensor, tensor: torch.Tensor, *, group=None,
                      async_op: bool = False, kind: str = "data"):
    """Equal-split all-to-all of flat ``tensor`` (p chunks) into ``output``."""
    p = group_size(group)
    meter.charge(collective_bytes("all_to_all", tensor.numel(), tensor.element_size(), p), kind, "all_to_all", p)
    if _local_only():
        output.copy_(tensor)
        return _done(output) if async_op else None
    return _held(dist.all_to_all_single(output, tensor, group=group, async_op=async_op))


def _held(work):
    """An asynchronous work is held from Python until it has completed (thinwire.comm.futures:
    a gloo thread must not drop its last reference while the interpreter finalises)."""
    if work is not None:
        hold(work)
    return work


class _done:
    """A finished work handle for the world-size-1 path, so callers need no special case."""

    def __init__(self, value: torch.Tensor):
        self._value = value

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result([self._value])
        return fut


class Stopwatch:
    """Accumulates wall time spent blocked on communication (``comm_wait_s``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += max(0.0, seconds)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s
