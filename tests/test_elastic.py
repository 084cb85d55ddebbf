"""Elastic replicas (thinwire.elastic, docs/elastic.md): the round loop with a changing live
set against a single-process reference that replays the membership tape.

- The simulator runs 3 slots as threads over the in-process hub with kills (in training and
  inside the outer collective), a late slot and a restart; the reference (``tape.replay``)
  recomputes the run from the tape alone, without any membership code, and must match every
  finishing slot bitwise (parameters, anchor + outer-optimizer state, losses).
- The same loop over torchft's Manager + lighthouse (threads of this process) matches its
  replay and advertises only loopback addresses.
- One-line config errors; the torchrun commands.
The multi-process SIGKILL drill is in the extended tier (test_elastic_drill.py).
"""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from thinwire.elastic.config import ElasticConfig, check_elastic
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.simulator import simulate
from thinwire.elastic.state import pack, unpack
from thinwire.elastic.tape import Tape, planned, replay
from thinwire.errors import ConfigError


def need_torchft():
    try:
        import torchft  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("torchft not installed (pip install 'thinwire[elastic]')")


def assert_equal_to_replay(spec, tape, finished):
    ref = replay(spec, tape)   # checks every round's consensus digest on the way
    assert sorted(finished) == sorted(ref)
    for s, rep in finished.items():
        assert rep.round == ref[s].round == len(tape.rounds)
        assert rep.params_digest() == ref[s].params_digest(), s
        assert rep.consensus_digest() == ref[s].consensus_digest(), s
        for a, b in zip(rep.model.parameters(), ref[s].model.parameters()):
            assert torch.equal(a, b)
        common = set(rep.losses) & set(ref[s].losses)
        assert common and all(rep.losses[t] == ref[s].losses[t] for t in common)
    return ref


def test_consensus_state_travels_as_json_and_raw_tensors():
    rep = Replica(ReplicaSpec(sync="diloco"), 0)
    rep.train_step(0)
    rep.apply_mean(rep.pseudo_gradient())
    schema, tensors = pack(rep.consensus_state())
    json.loads(schema)  # metadata is JSON: nothing is unpickled
    back = unpack(schema, [t.clone() for t in tensors])
    assert list(back["outer"]["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys kept
    other = Replica(ReplicaSpec(sync="diloco"), 1, joiner=True)
    other.heal(back)
    assert other.round == 1 and other.consensus_digest() == rep.consensus_digest()
    assert torch.equal(other.space.read_flat(), torch.cat([a.reshape(-1) for a in rep.anchor]))


def test_kills_a_late_slot_and_a_restart_equal_the_tape_replay():
    """diloco (outer Nesterov: outer state must heal too), 3 slots, 8 rounds of 4 steps:
    slot 2 dies in round 1's training and is restarted at round 3's quorum; slot 0 dies inside
    round 4's outer collective (the survivors retry the same round); slot 1 misses round 5's
    quorum (late), sits it out and heals."""
    spec = ReplicaSpec(sync="diloco", nominal=3, local_steps=4)
    tape, finished, hub = simulate(spec, 8, kill_in_training={2: (1, 6)}, restart={2: 3},
                                   kill_in_collective={0: 4}, late={1: 5})
    assert tape.live_sets() == [[0, 1, 2], [0, 1], [0, 1], [0, 1], [1, 2], [2], [2], [1, 2]]
    assert [e["healed"] for e in tape.rounds] == [{}, {}, {}, {"2": 0}, {}, {}, {"1": 2}, {}]
    assert [e["retries"] for e in tape.rounds][4] == 1 and sum(e["retries"] for e in tape.rounds) == 1
    assert [(r["slot"], r["round"], r["steps"]) for r in tape.lost] == [(1, 5, [20, 23])]
    assert tape.untrained(3, 4) == [(0, 16, 31), (1, 20, 27), (2, 4, 15)]
    assert sorted(finished) == [1, 2]
    assert_equal_to_replay(spec, tape, finished)


def test_local_updates_kill_equals_planned_absence():
    """sync=local: slot 1 SIGKILLed mid-round 2 and restarted (joins after round 3) equals the
    fault-free reference with slot 1 absent for the rounds the tape recorded."""
    spec = ReplicaSpec(sync="local", nominal=3, local_steps=3)
    tape, finished, _ = simulate(spec, 6, kill_in_training={1: (2, 7)}, restart={1: 3})
    assert tape.live_sets() == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 2], [0, 1, 2], [0, 1, 2]]
    assert tape.rounds[3]["healed"] == {"1": 0}
    ref = assert_equal_to_replay(spec, tape, finished)
    plan = planned(3, 6, {1: (2, 3)})           # faults.absent_at="1:2..3", no fault at all
    assert plan.live_sets() == tape.live_sets() and [e["healed"] for e in plan.rounds] == \
        [e["healed"] for e in tape.rounds]
    absent = replay(spec, plan, check_digests=False)
    for s in range(3):
        assert absent[s].consensus_digest() == finished[s].consensus_digest()
        assert absent[s].params_digest() == finished[s].params_digest()
    # slots 0 and 2 trained every batch; the joiner trained exactly slot 1's batches from round 4
    assert sorted(ref[1].losses) == list(range(12, 18)) == sorted(finished[1].losses)


def test_torchft_membership_in_process_matches_replay():
    """The same loop over torchft's Manager, lighthouse and process groups (2 slots as
    threads, no faults): replay-equal, and every address advertised is loopback."""
    need_torchft()
    from torchft._torchft import LighthouseServer

    from thinwire.elastic.membership import TorchftMembership
    from thinwire.elastic.protocol import ElasticRunner

    spec = ReplicaSpec(sync="diloco", nominal=2, local_steps=2)
    lh = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=2000)
    addr = lh.address().replace("http://", "")
    records, finished, errors, advertised = [], {}, [], []
    lock = threading.Lock()

    def body(slot):
        try:
            m = TorchftMembership(slot, addr, min_replicas=2, timeout_s=20, quorum_timeout_s=40)
            advertised.extend(m.advertised())
            rep = Replica(spec, slot)
            ElasticRunner(rep, m, 3, log=lambda r: (lock.acquire(), records.append(r), lock.release())).run()
            finished[slot] = rep
            m.shutdown()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    lh.shutdown()
    assert not errors, errors
    tape = Tape.merge(records)
    assert tape.live_sets() == [[0, 1]] * 3
    assert_equal_to_replay(spec, tape, finished)
    assert advertised and all(a.replace("http://", "").startswith("127.0.0.1:") for a in advertised)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(sync="ddp"), "sync=ddp: elastic=torchft needs replicas that diverge between syncs"),
    (dict(sync="local", engine="deepspeed"), "engine=deepspeed: elastic=torchft supports engine=ddp only"),
    (dict(sync="local", optim="adam1bit"), "optim=adam1bit: this optimizer plugin owns its exchange"),
    (dict(sync="local", slots=1), "elastic.min_replicas=2: above the slot count"),
    (dict(sync="local", master_addr="10.1.2.3"), "dist.master_addr=10.1.2.3: torchft's Manager listens on all"),
    (dict(sync="local", fragments=2), "sync.fragments=2: elastic=torchft: streaming fragments"),
])
def test_bad_combinations_fail_in_one_line(kwargs, msg):
    args = dict(slots=3, master_addr="127.0.0.1")
    args.update(kwargs)
    with pytest.raises(ConfigError) as e:
        check_elastic(ElasticConfig(name="torchft", min_replicas=2), **args)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,msg", [
    ("name", "etcd", "name=etcd: expected one of none, torchft"),
    ("min_replicas", 0, "min_replicas=0: must be >= 1"),
    ("heartbeat_timeout_ms", 50, "heartbeat_timeout_ms=50: must exceed heartbeat_ms=100"),
    ("grace_s", 0.0, "grace_s=0.0: must be positive"),
    ("lighthouse", "nohost", "lighthouse=nohost: expected host:port"),
])
def test_bad_values_fail_in_one_line(field, value, msg):
    with pytest.raises(ConfigError, match="^" + msg):
        ElasticConfig(**{"name": "torchft", field: value}).check()


def test_private_network_allows_a_routable_address():
    need_torchft()
    check_elastic(ElasticConfig(name="torchft", private_network=True), sync="local", slots=3, master_addr="10.1.2.3")
    check_elastic(ElasticConfig(name="none"), sync="ddp", slots=3)  # off: nothing to check


def test_torchrun_commands(capsys):
    from thinwire.elastic.launch import main

    assert main(["--torchrun", "--slots", "3", "--rounds", "7", "--grace-s", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0].endswith("torchft_lighthouse") and "--bind 127.0.0.1:29510" in lines[0]
    assert "--join_timeout_ms 2000" in lines[0]
    assert len(lines) == 4 and all("--max-restarts=3" in l and f"--slot {i} " in l for i, l in enumerate(lines[1:]))
    assert main(["--slots", "2", "--min-replicas", "3"]) == 2
    assert "elastic.min_replicas=3: above the slot count" in capsys.readouterr().err


def test_fewer_live_slots_than_min_replicas_fail_after_the_quorum_timeout():
    from thinwire.elastic.protocol import MembershipError

    spec = ReplicaSpec(sync="local", nominal=3, local_steps=2)
    with pytest.raises(MembershipError) as e:
        simulate(spec, 4, kill_in_training={2: (1, 2)}, min_replicas=3, timeout_s=1.5)
    msg = str(e.value)
    assert "no round committed within the quorum timeout" in msg and "\n" not in msg
    assert "round 1: live slots [0, 1] below min_replicas=3" in msg


def test_your_own_model_inner_adamw_and_data():
    """The library entry point: a model, inner optimizer (AdamW: its state is reset for a
    joiner), batches keyed by slot and a loss of your own, through the same loop."""
    spec = ReplicaSpec(sync="diloco", nominal=3, local_steps=2)

    def make(slot, joiner):
        model = torch.nn.Linear(5, 1)
        g = torch.Generator().manual_seed(7)  # the same initial parameters in every slot (threads share
        # the global RNG, so initialise from a generator of our own)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

        def batch(s, t):
            g = torch.Generator().manual_seed(1000 * s + t)
            x = torch.randn(8, 5, generator=g)
            return x, x.sum(1, keepdim=True) * (1 + s)

        return Replica(spec, slot, joiner, model=model, batch=batch, loss=torch.nn.functional.mse_loss,
                       inner=lambda params: torch.optim.AdamW(params, lr=0.05))

    tape, finished, _ = simulate(spec, 5, kill_in_training={0: (1, 2)}, restart={0: 2}, make_replica=make)
    assert tape.live_sets() == [[0, 1, 2], [1, 2], [1, 2], [0, 1, 2], [0, 1, 2]]
    ref = replay(spec, tape, make_replica=make)
    for s, rep in finished.items():
        assert rep.consensus_digest() == ref[s].consensus_digest() and rep.params_digest() == ref[s].params_digest()
    assert isinstance(finished[0].inner, torch.optim.AdamW) and finished[0].inner.state  # fresh at join, then used
