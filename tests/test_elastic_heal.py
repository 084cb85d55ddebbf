"""Heal by digest (``ElasticRunner.heal_phase``, docs/elastic.md "Healing"): replicas as threads
over the in-process hub; the reference is the source's own consensus state (tensor by tensor,
bitwise) and the bytes the hub's broadcasts actually carried, counted outside the protocol."""
from __future__ import annotations

import threading

import torch

from thinwire.elastic.membership import Hub, HubMembership
from thinwire.elastic.protocol import ElasticRunner
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.state import pack

SPEC = ReplicaSpec(sync="diloco", nominal=3)   # outer Nesterov: 4 anchor + 4 momentum tensors


class CountingMembership(HubMembership):
    """Records the bytes of every broadcast it takes part in."""

    def __init__(self, hub, slot):
        super().__init__(hub, slot)
        self.broadcast_bytes: list[int] = []

    def broadcast(self, t, root):
        self.broadcast_bytes.append(t.numel() * t.element_size())
        super().broadcast(t, root)


def one_round(rep: Replica, mean: torch.Tensor) -> Replica:
    rep.apply_mean(mean.clone())
    return rep


def heal(reps: dict, source: int, receivers: list[int]):
    """Run heal_phase on every member (rank = position in sorted slots); the runners."""
    hub = Hub(timeout_s=20)
    for s in reps:
        hub.register(s)
    runners = {s: ElasticRunner(rep, CountingMembership(hub, s), 0) for s, rep in reps.items()}
    errors = []

    def body(s):
        try:
            runners[s].m.quorum(0)
            runners[s].heal_phase(sorted(reps).index(source), s == source, s in receivers)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(s,)) for s in reps]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return runners


def tensor_bytes(rep: Replica, indices) -> int:
    tensors = pack(rep.consensus_state())[1]
    return sum(tensors[i].numel() * tensors[i].element_size() for i in indices)


def assert_healed_from(rep: Replica, src: Replica) -> None:
    schema, tensors = pack(rep.consensus_state())
    src_schema, src_tensors = pack(src.consensus_state())
    assert schema == src_schema and len(tensors) == len(src_tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, src_tensors))
    assert torch.equal(rep.space.read_flat(), src.space.flat(src.anchor))   # parameters = anchor


def trained_pair():
    a = Replica(SPEC, 0)
    a.train_step(0)
    mean = a.pseudo_gradient()
    return one_round(a, mean), mean


def test_an_identical_receiver_gets_no_tensor_bytes_and_ends_bitwise_equal():
    a, mean = trained_pair()
    b = one_round(Replica(SPEC, 1), mean)
    runners = heal({0: a, 1: b}, source=0, receivers=[1])
    rec = runners[1].records[-1]
    assert (rec["tensors_sent"], rec["tensors_skipped"], rec["bytes_sent"]) == (0, 8, 0)
    assert rec["bytes_skipped"] == tensor_bytes(a, range(8))
    schema_bytes = len(pack(a.consensus_state())[0].encode())
    assert runners[1].m.broadcast_bytes == [16, schema_bytes, 8 * 9]   # sizes, schema, digests: no tensor
    assert_healed_from(b, a)


def test_receivers_get_exactly_the_union_of_the_tensors_they_lack():
    """Slot 1 lacks momentum tensor 6 (one ulp off) and is a round behind; slot 2 lacks anchor
    tensor 0; the contributor slot 3 needs nothing but takes part in every collective."""
    a, mean = trained_pair()
    b, c, d = (one_round(Replica(SPEC, s), mean) for s in (1, 2, 3))
    mom = b.outer.optimizer.state[b.outer.optimizer.param_groups[0]["params"][2]]["momentum_buffer"]
    mom.view(torch.int32)[0, 0] += 1
    b.round = 0
    c.anchor[0].view(torch.int32)[3, 1] -= 1
    runners = heal({0: a, 1: b, 2: c, 3: d}, source=0, receivers=[1, 2])
    for s in (1, 2):
        rec = runners[s].records[-1]
        assert (rec["tensors_sent"], rec["bytes_sent"]) == (2, tensor_bytes(a, [0, 6]))
    assert runners[3].records == []
    for r in runners.values():
        assert r.m.broadcast_bytes[3:] == [tensor_bytes(a, [0]), tensor_bytes(a, [6])]
    assert b.round == 1
    assert_healed_from(b, a)
    assert_healed_from(c, a)


def test_a_fresh_joiner_receives_everything():
    a, _ = trained_pair()
    j = Replica(SPEC, 1, joiner=True)   # no outer momentum yet: another layout
    runners = heal({0: a, 1: j}, source=0, receivers=[1])
    rec = runners[1].records[-1]
    assert (rec["tensors_sent"], rec["tensors_skipped"]) == (8, 0)
    assert rec["bytes_sent"] == sum(runners[1].m.broadcast_bytes[3:]) == tensor_bytes(a, range(8))
    assert_healed_from(j, a)
