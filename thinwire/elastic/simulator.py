"""R replicas as threads of one process, over the in-process :class:`~.membership.Hub`, running
the same round loop (``protocol.ElasticRunner``) as the torchft-backed processes, with a
schedule of faults:

- ``kill_in_training``: {slot: (round, step)}: the slot dies before that global step of that round
  (its partial round is lost with it);
- ``kill_in_collective``: {slot: round}: the slot dies after the header of that round's sync,
  before the data collective (the survivors' collective fails; they retry the same round);
- ``late``: {slot: round}: the slot misses that round's quorum (held back, as a replica past
  the grace window): it sits the round out, its stale round is logged lost, and it heals;
- ``restart``: {slot: round}: a fresh process for the slot joins the quorum of that round and
  heals after it.
"""
from __future__ import annotations

import threading
from typing import Optional

from .membership import Hub, HubMembership, Killed
from .protocol import ElasticRunner
from .replica import Replica, ReplicaSpec
from .tape import Tape


class ScriptedFaults:
    def __init__(self, kill_in_training=None, kill_in_collective=None):
        self.kt, self.kc = dict(kill_in_training or {}), dict(kill_in_collective or {})

    def in_training(self, slot: int, rnd: int, step: int) -> None:
        if self.kt.get(slot) == (rnd, step):
            del self.kt[slot]
            raise Killed(f"slot {slot} killed at round {rnd} step {step}")

    def before_data(self, slot: int, rnd: int) -> None:
        if self.kc.get(slot) == rnd:
            del self.kc[slot]
            raise Killed(f"slot {slot} killed in round {rnd}'s collective")


def simulate(spec: ReplicaSpec, rounds: int, *, kill_in_training: Optional[dict] = None,
             kill_in_collective: Optional[dict] = None, late: Optional[dict] = None,
             restart: Optional[dict] = None, min_replicas: int = 1, timeout_s: float = 30.0,
             make_replica=None):
    """Run ``spec.nominal`` slots for ``rounds`` rounds under the schedule; returns
    (tape, {slot: final Replica} of the replicas that finished, hub). ``make_replica(slot,
    joiner)``: your own replica (default ``Replica(spec, slot, joiner)``)."""
    make_replica = make_replica or (lambda slot, joiner: Replica(spec, slot, joiner=joiner))
    faults = ScriptedFaults(kill_in_training, kill_in_collective)
    records: list[dict] = []
    lock = threading.Lock()
    finished: dict[int, Replica] = {}
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def log(rec):
        with lock:
            records.append(rec)

    def body(slot: int, joiner: bool):
        rep = make_replica(slot, joiner)
        runner = ElasticRunner(rep, HubMembership(hub, slot), rounds, min_replicas=min_replicas,
                               faults=faults, log=log)
        try:
            runner.run()
            finished[slot] = rep
        except Killed:
            pass
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)
        finally:
            hub.die(slot)

    def spawn(slot: int, joiner: bool = True):
        th = threading.Thread(target=body, args=(slot, joiner), name=f"slot{slot}", daemon=True)
        threads.append(th)
        th.start()

    joins: dict[int, list[int]] = {}
    for s, r in (restart or {}).items():
        joins.setdefault(r, []).append(s)
    hub = Hub(late=late, joins=joins, spawn=spawn, timeout_s=timeout_s)
    for s in range(spec.nominal):
        hub.register(s)
    for s in range(spec.nominal):
        spawn(s, joiner=False)
    i = 0
    while i < len(threads):  # threads spawned by the hub join the list while we wait
        threads[i].join()
        i += 1
    if errors:
        raise errors[0]
    return Tape.merge(records), finished, hub
