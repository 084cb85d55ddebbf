"""Compressed pseudo-gradients with error feedback under elastic replicas (issue 33, item 1;
``thinwire.elastic.exchange``, docs/elastic.md "Compressed pseudo-gradients"):

- in process (default tier): 3 slots as threads over the in-process hub with ``comm=chunk_topk``
  + ``ef``: a death in training, a restart, a late slot; against a single-process reference
  written here from the compressor alone (per parameter C(Delta + e), e <- q - C(q), the mean of
  the contributors' decoded messages summed in slot order; a joiner's residual 0), and against
  the same reference over the planned absence's tape; the residual norms the tape logs as lost;
- ``thinwire-train elastic=torchft comm=chunk_topk`` (extended): slot 2 of 3 SIGKILLed mid-round
  and restarted equals, bitwise, the ordinary run with ``trainer.faults.absent_at`` for the rounds
  the tape recorded;
- the one-line refusals of what stays refused.
"""
from __future__ import annotations

import pytest
import torch

from thinwire.comm.aggregator import compressor_from_config
from thinwire.elastic.exchange import RowCodec
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.simulator import simulate
from thinwire.elastic.tape import planned

# the tiny MLP's weights (128 and 64 elements) compressed in runs of 32 keeping 4, its biases dense;
# mean over all contributors so that the reference below is a plain sum of decoded messages
COMM = {"name": "chunk_topk", "chunk": 32, "k": 4, "bits": 2, "mean": "all", "feedback": "ef",
        "min_numel": 64, "warmup_steps": 1}


def with_codec(spec, comm=COMM):
    def make(slot, joiner):
        rep = Replica(spec, slot, joiner=joiner)
        rep.exchange = RowCodec(comm, rep.space.names, rep.space.sizes)
        return rep
    return make


def reference(spec, tape, comm=COMM):
    """The run the tape describes, in one process, from the compressor alone: per round each live
    slot trains its round, q = Delta + e per parameter (Delta alone for a fresh residual),
    C(q) for a parameter of at least ``min_numel`` elements (q itself otherwise), e <- q - C(q); the
    mean is the slot-order sum of the live slots' C(q) over their number (warm-up rounds: of Delta);
    a healed slot starts from its source's consensus state with residual 0. Returns (replicas,
    residuals: slot -> its residual norm after each round it contributed to)."""
    comp = compressor_from_config(comm["name"], comm)
    reps, e, norms = {}, {}, {}
    for entry in tape.rounds:
        R, live = entry["round"], entry["live_slots"]
        for s in live:
            if R == 0 and s not in reps:
                reps[s], e[s] = Replica(spec, s), {}
            assert reps[s].round == R
        sent = {}
        for s in live:
            rep = reps[s]
            for t in rep.steps_of(R):
                rep.train_step(t)
            delta = rep.pseudo_gradient()
            if R < comm["warmup_steps"]:
                sent[s] = delta
                continue
            out, sq = [], 0.0
            for name, g, size in zip(rep.space.names, delta.split(rep.space.sizes), rep.space.sizes):
                q = g + e[s][name] if name in e[s] else g.clone()
                if size >= comm["min_numel"]:
                    from thinwire.comm.collectives import segment_step
                    c = comp.decompress(comp.compress(q, step=segment_step(R, name)))
                else:
                    c = q
                e[s][name] = q - c
                sq += float(e[s][name].double().pow(2).sum())
                out.append(c)
            sent[s] = torch.cat(out)
            norms.setdefault(s, {})[R] = sq ** 0.5
        acc = sent[live[0]].clone()
        for s in live[1:]:
            acc += sent[s]
        mean = acc / len(live)
        for s in live:
            reps[s].apply_mean(mean)
        nxt = {s: reps[s] for s in live}
        for s, src in entry["healed"].items():
            joiner = Replica(spec, int(s), joiner=True)
            joiner.heal(reps[src].consensus_state())
            nxt[int(s)], e[int(s)] = joiner, {}
        reps = nxt
    return reps, norms


def same_replica(a, b) -> None:
    assert a.round == b.round
    assert a.consensus_digest() == b.consensus_digest()
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)
    common = set(a.losses) & set(b.losses)
    assert common and all(a.losses[t] == b.losses[t] for t in common)


@pytest.mark.parametrize("sync", ["local", "diloco"])
def test_compressed_kill_restart_and_late_slot_equal_the_reference_with_joiner_residual_zero(sync):
    """3 slots, 9 rounds of 3 steps: slot 2 dies in round 2's training and is restarted at round
    3's quorum (healed after it, contributes from round 4); slot 1 misses round 6's quorum (late),
    logs its stale round and its residual as lost, heals after round 7 with residual 0."""
    spec = ReplicaSpec(sync=sync, nominal=3, local_steps=3)
    tape, finished, _ = simulate(spec, 9, kill_in_training={2: (2, 7)}, restart={2: 3}, late={1: 6},
                                 make_replica=with_codec(spec))
    assert tape.live_sets() == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [0, 2], [0, 2], [0, 1, 2]]
    ref, norms = reference(spec, tape)
    assert sorted(finished) == sorted(ref) == [0, 1, 2]
    for s in range(3):
        same_replica(finished[s], ref[s])
    # the residuals taken out of the mean: slot 2's after round 1 (it left), slot 1's after round 5 (late)
    lost = sorted((r["slot"], r["round"], r["residual_norm"]) for r in tape.lost if r["reason"] == "residual")
    assert [x[:2] for x in lost] == [(1, 6), (2, 2)], lost
    assert lost[0][2] == pytest.approx(norms[1][5], rel=1e-12) and lost[0][2] > 0
    assert lost[1][2] == pytest.approx(norms[2][1], rel=1e-12) and lost[1][2] > 0
    assert [(r["slot"], r["round"], r["steps"]) for r in tape.lost if r["reason"] == "stale round"] == [(1, 6, [18, 20])]
    # the faulty run equals the fault-free one with slot 2 planned absent in rounds 2-3, slot 1 in 6-7
    absent, _ = reference(spec, planned(3, 9, {2: (2, 3), 1: (6, 7)}))
    for s in range(3):
        same_replica(finished[s], absent[s])


def test_a_retried_round_sends_from_the_committed_residual_and_rows_have_their_fixed_size():
    """Slot 2 dies inside round 3's data collective: the survivors' rows of the failed try are
    dropped with their staged residuals, they retry round 3 from the same Delta and the residual of
    round 2 (the reference has no retry at all). The rows have the size the model's shapes fix: the
    compressed weights, the dense biases, 8 bytes of residual norm."""
    spec = ReplicaSpec(sync="diloco", nominal=3, local_steps=2)
    tape, finished, _ = simulate(spec, 5, kill_in_collective={2: 3}, make_replica=with_codec(spec))
    assert tape.live_sets() == [[0, 1, 2]] * 3 + [[0, 1]] * 2 and tape.rounds[3]["retries"] == 1
    ref, norms = reference(spec, tape)
    for s in (0, 1):
        same_replica(finished[s], ref[s])
        assert finished[s].exchange.residual_norm() == pytest.approx(norms[s][4], rel=1e-12)
    codec = finished[0].exchange
    comp = codec.compressor
    want = sum(comp.compress(torch.zeros(n), step=0).nbytes if n >= 64 else 4 * n for n in codec.sizes) + 8
    assert codec.row_bytes == want < 4 * sum(codec.sizes)
