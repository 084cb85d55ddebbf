"""The run-time guards of an elastic round (``thinwire.elastic.protocol``, issue 33 item 3): the
drift guard over the live set and the finiteness vote, both carried in the round's header
all-reduce.

- One ulp on one slot's anchor: every member stops at that round's header with one line naming
  the slot that differs and the slot it differs from (the non-elastic guard's rule: a hash, not
  a tolerance; no heal).
- A non-finite pseudo-gradient of one contributor skips the round everywhere (the non-elastic
  ``sync=local`` rule: nothing is sent, every contributor restarts from its anchor): against the
  single-process replay, which decides the skip from the pseudo-gradients itself, bitwise.

In process (threads over the in-process hub, the same round loop as the torchft processes);
the trainer path of the drift guard (``trainer.faults.drift_at`` in a slot process, the launcher
restarting no slot) is an extended test.
"""
from __future__ import annotations

import pytest
import torch

from thinwire.elastic.protocol import LiveDriftError
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.simulator import simulate
from thinwire.elastic.tape import replay

SPEC = ReplicaSpec(sync="diloco", local_steps=3, nominal=3)


def faulty(slot: int, step: int, fault):
    """Replicas whose slot ``slot`` applies ``fault(replica)`` after its step ``step``."""
    class Faulty(Replica):
        def train_step(self, t: int) -> float:
            loss = super().train_step(t)
            if self.slot == slot and t == step:
                with torch.no_grad():
                    fault(self)
            return loss

    return lambda s, joiner: Faulty(SPEC, s, joiner=joiner)


def one_ulp_on_the_anchor(rep: Replica) -> None:
    x = rep.anchor[0].view(-1)[:1]
    x.copy_(torch.nextafter(x, torch.full_like(x, float("inf"))))


def nan_in_the_parameters(rep: Replica) -> None:
    next(rep.model.parameters()).view(-1)[0] = float("nan")


def test_one_ulp_on_a_slot_anchor_stops_every_slot_naming_it():
    H = SPEC.local_steps
    with pytest.raises(LiveDriftError) as err:
        simulate(SPEC, 4, make_replica=faulty(2, 2 * H, one_ulp_on_the_anchor), timeout_s=10)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("replica drift over the live set at round 2: ") and \
        "of slot 2 differs from slot 0's" in msg, msg


def test_a_non_finite_pseudo_gradient_skips_the_round_everywhere_as_the_replay():
    H = SPEC.local_steps
    make = faulty(1, 2 * H - 1, nan_in_the_parameters)  # slot 1's last step of round 1
    tape, finished, _ = simulate(SPEC, 4, make_replica=make, timeout_s=10)
    assert [e.get("nonfinite", []) for e in tape.rounds] == [[], [1], [], []]
    assert tape.live_sets() == [[0, 1, 2]] * 4
    assert (0, H, 2 * H - 1) in tape.untrained(3, H) and (2, H, 2 * H - 1) in tape.untrained(3, H)
    ref = replay(SPEC, tape, make_replica=make)  # decides the skip from the Deltas, checks each digest
    for s in range(3):
        assert all(torch.equal(a, b) for a, b in zip(finished[s].anchor, ref[s].anchor)), s
        assert all(torch.equal(p, q) for p, q in zip(finished[s].model.parameters(), ref[s].model.parameters())), s
        assert finished[s].losses == ref[s].losses, s
        assert all(torch.isfinite(p).all() for p in finished[s].model.parameters()), s


@pytest.mark.extended  # one elastic run of 2 slots, ~30-50 s at load average ~10 (process start-up)
def test_drift_at_in_a_slot_process_stops_the_run_and_no_slot_is_restarted(tmp_path):
    """``thinwire-train elastic=torchft``: one ulp on slot 1's anchor after step 4 (the end of round
    0, ``trainer.faults.drift_at``): both slots stop at round 1's header with the one line, exit
    status 4, and the launcher restarts neither (a restart would heal from a copy of unknown
    truth) and exits 1."""
    import subprocess
    import sys

    from test_elastic import need_torchft
    from test_elastic_drill import private_net
    from test_elastic_trainer import BASE, REPO, free_port, steps

    need_torchft()
    run = tmp_path / "el"
    proc = subprocess.run([*private_net(), sys.executable, "-m", "thinwire.train", *BASE, *steps(12), "sync=local",
                           "dist.nproc=2", "elastic=torchft", f"elastic.lighthouse_port={free_port()}",
                           "elastic.grace_s=5", "trainer.faults.rank=1", "trainer.faults.drift_at=4",
                           f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped: replica drift over the live set" in proc.stderr, proc.stderr[-2000:]
    assert "restarts" not in proc.stdout  # no "training complete"
    for s in (0, 1):
        assert not (run / "elastic" / f"slot{s}.attempt1.log").exists(), s  # restarted neither
        log = (run / "elastic" / f"slot{s}.attempt0.log").read_text()
        lines = [ln for ln in log.splitlines() if "replica drift" in ln]
        assert len(lines) == 1 and lines[0].startswith("thinwire: rank 0: error: replica drift over the live set at "
                                                       "round 1: ") and "of slot 1 differs from slot 0's" in lines[0], log
