"""The membership interface of elastic replicas, and its two implementations.

``Membership`` (what ``protocol.ElasticRunner`` calls)::

    quorum(step)           block until a quorum of live replicas forms; the group is rebuilt
    rank()                 this replica's rank in the current quorum's group
    allreduce_sum(t)       in place, over the quorum; raises MembershipError on a failure
    broadcast(t, root)     in place, from rank ``root``; raises MembershipError
    should_commit()        the commit vote
    report_error(e)        a failed round: the next quorum is a new one
    timed_out(elapsed_s)   whether a round's retries have run past the quorum timeout

:class:`TorchftMembership` is torchft's membership layer used as an engine: one
``torchft.manager.Manager`` per slot (replica group of one process), its lighthouse quorum,
its ``ProcessGroupGloo`` reconfigured per quorum id, its ``should_commit`` vote. torchft's
healing and checkpoint transports are not used (``allow_heal=False``; the transport given to
the Manager refuses to serve): thinwire heals over the group itself (``protocol``), without
pickle or an HTTP server. Every address it advertises is the ``host`` given (loopback in tests).

:class:`Hub` / :class:`HubMembership`: the same interface for replicas that are threads of one
process (``simulator``), with scripted deaths, late replicas and restarts.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Optional

import torch

from .protocol import MembershipError


# -- torchft ---------------------------------------------------------------------------------
def _refusing_transport():
    from torchft.checkpointing.transport import CheckpointTransport

    class NoTransport(CheckpointTransport):
        """torchft's heal transports unpickle and serve HTTP on every interface; thinwire heals
        over the process group instead, so this one refuses."""

        def metadata(self) -> str:
            return "thinwire-heals-over-the-group"

        def send_checkpoint(self, dst_ranks, step, state_dict, timeout) -> None:
            raise RuntimeError("thinwire elastic: torchft checkpoint transport disabled")

        def disallow_checkpoint(self) -> None:
            pass

        def recv_checkpoint(self, src_rank, metadata, step, timeout):
            raise RuntimeError("thinwire elastic: torchft checkpoint transport disabled")

        def shutdown(self, wait: bool = True) -> None:
            pass

    return NoTransport()


class TorchftMembership:
    """One slot's membership through torchft: ``lighthouse`` is ``host:port`` of a running
    ``torchft_lighthouse``; ``host`` the address this replica's store binds to and advertises."""

    def __init__(self, slot: int, lighthouse: str, *, host: str = "127.0.0.1", min_replicas: int = 1,
                 timeout_s: float = 10.0, quorum_timeout_s: float = 60.0, heartbeat_ms: int = 100,
                 connect_timeout_s: float = 30.0):
        from torch.distributed import TCPStore
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        self.slot, self.quorum_timeout_s = slot, quorum_timeout_s
        self.store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.pg = ProcessGroupGloo(timeout=timedelta(seconds=timeout_s))
        self.manager = Manager(
            pg=self.pg, load_state_dict=None, state_dict=None, min_replica_size=min_replicas,
            use_async_quorum=False, timeout=timedelta(seconds=timeout_s),
            quorum_timeout=timedelta(seconds=quorum_timeout_s),
            connect_timeout=timedelta(seconds=connect_timeout_s), rank=0, world_size=1,
            store_addr=host, store_port=self.store.port, lighthouse_addr=f"http://{lighthouse}",
            replica_id=f"slot{slot}", hostname=host, heartbeat_interval=timedelta(milliseconds=heartbeat_ms),
            checkpoint_transport=_refusing_transport(), init_sync=False)

    def quorum(self, step: int) -> None:
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        try:
            self.manager.start_quorum(allow_heal=False)
        except Exception as e:  # the lighthouse's quorum timed out or the group failed to form
            raise MembershipError(f"quorum: {type(e).__name__}: {e}") from None
        if self.manager.errored() is not None:
            raise MembershipError(f"quorum: {self.manager.errored().original_exception}")

    def rank(self) -> int:
        return self.pg.parent.rank()

    def size(self) -> int:
        return self.pg.size()

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except Exception as e:
            raise MembershipError(f"{what}: {type(e).__name__}: {e}") from None
        err = self.pg.errored()
        if err is not None:
            raise MembershipError(f"{what}: {err}")

    def allreduce_sum(self, t: torch.Tensor) -> None:
        from torch.distributed import AllreduceOptions, ReduceOp

        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        try:
            work = self.pg.allreduce([t], opts)
        except Exception as e:
            raise MembershipError(f"allreduce: {type(e).__name__}: {e}") from None
        self._wait(work, "allreduce")

    def broadcast(self, t: torch.Tensor, root: int) -> None:
        try:
            work = self.pg.broadcast_one(t, root)
        except Exception as e:
            raise MembershipError(f"broadcast: {type(e).__name__}: {e}") from None
        self._wait(work, "broadcast")

    def should_commit(self) -> bool:
        try:
            return bool(self.manager.should_commit())
        except Exception as e:
            raise MembershipError(f"should_commit: {type(e).__name__}: {e}") from None

    def report_error(self, e: Exception) -> None:
        self.manager.report_error(e)

    def timed_out(self, elapsed_s: float) -> bool:
        return elapsed_s > self.quorum_timeout_s

    def advertised(self) -> list[str]:
        """The addresses this replica advertises (its Manager server, its store)."""
        return [self.manager._manager.address() if self.manager._manager is not None else "",
                f"{self.store.host}:{self.store.port}"]

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
        self.pg.shutdown()


# -- in-process hub (the simulator) ----------------------------------------------------------
class Killed(BaseException):
    """A scripted death of a simulated replica (its thread ends; the hub drops the slot)."""


class Hub:
    """Quorums and collectives for replica threads. A quorum forms once every registered,
    alive slot is asking, except slots scripted late for the quorum's round (``late``:
    slot -> round), which are held back to the next quorum. ``joins``: round -> slots to
    start (``spawn(slot)``) before the quorum of that round forms."""

    def __init__(self, late: Optional[dict] = None, joins: Optional[dict] = None, spawn=None,
                 timeout_s: float = 30.0):
        self.cv = threading.Condition()
        self.alive: set[int] = set()
        self.asking: dict[int, int] = {}           # slot -> step it asks with
        self.assigned: dict[int, tuple] = {}       # slot -> (epoch, members)
        self.epoch, self.members = 0, []
        self.broken: set[int] = set()
        self.ops: dict[tuple, dict] = {}
        self.late, self.joins, self.spawn = dict(late or {}), dict(joins or {}), spawn
        self.timeout_s = timeout_s
        self.quorums: list[list[int]] = []
        self.trace: list = []

    def register(self, slot: int) -> None:
        with self.cv:
            self.alive.add(slot)

    def die(self, slot: int) -> None:
        with self.cv:
            self.alive.discard(slot)
            self.asking.pop(slot, None)
            if slot in self.members:
                self.broken.add(self.epoch)
            self._try_form()
            self.cv.notify_all()

    def _try_form(self) -> None:
        if not self.asking:
            return
        R = max(self.asking.values())
        for r in sorted(k for k in self.joins if k <= R):
            for s in self.joins.pop(r):
                self.alive.add(s)
                self.spawn(s)
        held = {s for s, r in self.late.items() if r == R and s in self.asking and self.asking[s] <= R}
        if any(s not in self.asking for s in self.alive):
            return
        members = sorted(s for s in self.asking if s not in held)
        if not members:
            return
        for s in held:  # late once: the next quorum takes it (stale) and heals it
            self.late.pop(s)
        self.epoch += 1
        self.members = members
        self.quorums.append(members)
        self.trace.append((R, members, dict(self.asking), sorted(self.alive), sorted(held)))
        for s in members:
            self.asking.pop(s)
            self.assigned[s] = (self.epoch, members)
        self.cv.notify_all()

    def quorum(self, slot: int, step: int) -> tuple[int, list[int]]:
        with self.cv:
            self.asking[slot] = step
            self._try_form()
            if not self.cv.wait_for(lambda: slot in self.assigned, timeout=self.timeout_s):
                raise MembershipError(f"slot {slot}: no quorum within {self.timeout_s}s")
            return self.assigned.pop(slot)

    def collective(self, epoch: int, seq: int, members: list[int], slot: int, t: torch.Tensor,
                   combine) -> torch.Tensor:
        with self.cv:
            if epoch in self.broken:
                raise MembershipError(f"epoch {epoch}: a member died")
            op = self.ops.setdefault((epoch, seq), {})
            op[slot] = t.clone()
            self.cv.notify_all()
            self.cv.wait_for(lambda: epoch in self.broken or len(op) == len(members), timeout=self.timeout_s)
            if len(op) != len(members):  # complete wins: a member may leave right after its part
                raise MembershipError(f"epoch {epoch}: a member died in a collective")
            return combine([op[s] for s in members])


class HubMembership:
    """``Membership`` of one simulated replica over a :class:`Hub`."""

    def __init__(self, hub: Hub, slot: int):
        self.hub, self.slot = hub, slot
        self.epoch, self.members, self.seq = 0, [], 0

    def quorum(self, step: int) -> None:
        self.epoch, self.members = self.hub.quorum(self.slot, step)
        self.seq = 0

    def rank(self) -> int:
        return self.members.index(self.slot)

    def _op(self, t, combine) -> None:
        self.seq += 1
        t.copy_(self.hub.collective(self.epoch, self.seq, self.members, self.slot, t, combine))

    def allreduce_sum(self, t: torch.Tensor) -> None:
        def total(ts):
            acc = ts[0].clone()
            for x in ts[1:]:
                acc += x
            return acc
        self._op(t, total)

    def broadcast(self, t: torch.Tensor, root: int) -> None:
        self._op(t, lambda ts: ts[root])

    def should_commit(self) -> bool:
        return True

    def report_error(self, e: Exception) -> None:
        pass

    def timed_out(self, elapsed_s: float) -> bool:
        return elapsed_s > self.hub.timeout_s
