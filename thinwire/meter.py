"""Byte counters a user loop reads and logs (docs/library.md, "Counting bytes").

Every collective thinwire issues is charged to a :class:`WireMeter` (per rank, bytes sent
under the standard algorithm of the collective: ``thinwire.comm.accounting``). Pass one
meter to ``comm_hook(meter=...)``, ``OuterLoop(meter=...)``, ``MeZO(meter=...)`` or
``lora_ga_init(meter=...)``; read it with ``meter.take()`` (since the last take, typed
:class:`ByteCounts`) or ``meter.total()``; compare with :func:`allreduce_bytes`.
"""
from .comm.accounting import ByteCounts, WireMeter, allreduce_bytes

__all__ = ["ByteCounts", "WireMeter", "allreduce_bytes"]
