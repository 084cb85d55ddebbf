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
from thinwire.comm.collectives import segment_step
from thinwire.elastic.exchange import RowCodec
from thinwire.elastic.replica import Replica, ReplicaSpec
from thinwire.elastic.simulator import simulate
from thinwire.elastic.tape import planned

# the tiny MLP's weights (128 and 64 elements) compressed in runs of 32 keeping 4, its biases dense;
# mean over all contributors so that the reference below is a plain sum of decoded messages
COMM = {"name": "chunk_topk", "chunk": 32, "k": 4, "bits": 2, "mean": "all", "feedback": "ef",
        "min_numel": 64, "warmup_steps": 1}


class Traced(RowCodec):
    """The codec, noting each feedback step it takes: D (dense round), C (compressed)."""
    kinds = ""

    def dense_step(self, delta, mean, rnd):
        self.kinds += "D"
        return super().dense_step(delta, mean, rnd)

    def step(self, enc, mean):
        self.kinds += "C"
        return super().step(enc, mean)


def with_codec(spec, comm=COMM):
    def make(slot, joiner):
        rep = Replica(spec, slot, joiner=joiner)
        rep.exchange = Traced(comm, rep.space.names, rep.space.sizes)
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
                    c = comp.decompress(comp.compress(q, step=segment_step(R, name)))
                else:
                    c = q
                e[s][name] = q - c
                sq += float(e[s][name].double().pow(2).sum())
                out.append(c)
            sent[s] = torch.cat(out)
            norms.setdefault(s, {})[R] = sq ** 0.5
        reps = outer_step_and_heal(spec, reps, entry, slot_order_mean(sent, live))
        for s in entry["healed"]:
            e[int(s)] = {}
    return reps, norms


def slot_order_mean(vectors: dict, live: list[int]) -> torch.Tensor:
    acc = vectors[live[0]].clone()
    for s in live[1:]:
        acc += vectors[s]
    return acc / len(live)


def outer_step_and_heal(spec, reps: dict, entry: dict, mean: torch.Tensor) -> dict:
    """Every live slot takes the outer step with ``mean``; the round's healed slots start from their
    source's consensus state (fresh inner optimizer). The replicas of the next round."""
    for s in entry["live_slots"]:
        reps[s].apply_mean(mean)
    nxt = {s: reps[s] for s in entry["live_slots"]}
    for s, src in entry["healed"].items():
        nxt[int(s)] = Replica(spec, int(s), joiner=True)
        nxt[int(s)].heal(reps[src].consensus_state())
    return nxt


EF21 = {"name": "topk", "ratio": 0.1, "feedback": "ef21", "init": "dense", "min_numel": 64, "warmup_steps": 1}


def reference_ef21(spec, tape, comm=EF21):
    """EF21 (Richtarik, Sokolov, Fatkhullin 2021, Alg. 1) over the tape, in one process: a dense
    round (the warm-up, and the first round of every new set of live slots) steps with the
    slot-order mean of the Delta_i; after it, g_i = Delta_i and G = that mean (warm-up) or
    g_i = G = 0 (a change: Alg. 1's zero start over the new set). Any other round sends
    c_i = C(Delta_i - g_i) per parameter (exact under ``min_numel``), g_i += c_i, G += the
    slot-order mean of the c_i, and steps with G."""
    comp = compressor_from_config(comm["name"], comm)
    reps, g, G, prev = {}, {}, None, None
    for entry in tape.rounds:
        R, live = entry["round"], entry["live_slots"]
        for s in live:
            if R == 0 and s not in reps:
                reps[s] = Replica(spec, s)
            assert reps[s].round == R
        deltas = {}
        for s in live:
            for t in reps[s].steps_of(R):
                reps[s].train_step(t)
            deltas[s] = reps[s].pseudo_gradient()
        sizes, names = reps[live[0]].space.sizes, reps[live[0]].space.names
        if R < comm["warmup_steps"] or live != prev:
            step = slot_order_mean(deltas, live)
            warm = R < comm["warmup_steps"]
            G = step.clone() if warm else torch.zeros_like(step)
            g = {s: deltas[s].clone() if warm else torch.zeros_like(deltas[s]) for s in live}
        else:
            c = {}
            for s in live:
                out = []
                for name, d, gi, size in zip(names, deltas[s].split(sizes), g[s].split(sizes), sizes):
                    x = d - gi
                    out.append(comp.decompress(comp.compress(x, step=segment_step(R, name))) if size >= 64 else x)
                c[s] = torch.cat(out)
                g[s] = g[s] + c[s]
            G = G + slot_order_mean(c, live)
            step = G
        reps, prev = outer_step_and_heal(spec, reps, entry, step), live
    return reps


def test_ef21_takes_one_dense_round_after_every_membership_change():
    """topk + EF21, 3 slots, 8 rounds: slot 2 dies in round 2's training, is restarted at round 3's
    quorum and contributes from round 4. Rounds 0 (warm-up), 2 (slot 2 gone) and 4 (slot 2 back) are
    dense (after 2 and 4 every g_i and G restart from 0); the others send C(Delta_i - g_i).
    Bitwise equal to EF21 over the tape in one process, and to it over the planned absence's tape."""
    spec = ReplicaSpec(sync="diloco", nominal=3, local_steps=3)
    tape, finished, _ = simulate(spec, 8, kill_in_training={2: (2, 7)}, restart={2: 3},
                                 make_replica=with_codec(spec, EF21))
    assert tape.live_sets() == [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert finished[0].exchange.kinds == "DCDCDCCC", finished[0].exchange.kinds  # slot 0: dense / compressed
    ref = reference_ef21(spec, tape)
    absent = reference_ef21(spec, planned(3, 8, {2: (2, 3)}))
    for s in range(3):
        same_replica(finished[s], ref[s])
        same_replica(finished[s], absent[s])



def test_ef21_round_after_a_rejoin_steps_with_its_own_compressed_mean():
    """The codec alone (no model), slots 0-1 then slot 2 back: round 0 warm-up (dense), round 1
    compressed, round 2 a change (dense: the step is the exact mean), round 3 compressed with
    pseudo-gradients a tenth of round 2's (an inner lr decaying). EF21 restarts from g_i = G = 0
    after the change, so round 3's outer step is the slot-order mean of C(Delta_i) (Delta_i itself
    under ``min_numel``), computed here from the compressor; not round 2's mean a second time."""
    names, sizes = ["w", "b"], [128, 8]
    comp = compressor_from_config("topk", EF21)
    codecs = {s: RowCodec(EF21, names, sizes) for s in range(3)}
    gen = torch.Generator().manual_seed(0)
    deltas = {r: {s: torch.randn(136, generator=gen) * (0.1 if r == 3 else 1.0) for s in range(3)} for r in range(4)}
    steps = {}
    for rnd, live in enumerate([[0, 1], [0, 1], [0, 1, 2], [0, 1, 2]]):
        dense = codecs[live[0]].dense(rnd, live)
        assert dense == (rnd in (0, 2))
        if dense:
            steps[rnd] = slot_order_mean(deltas[rnd], live)
            encs = {s: codecs[s].dense_step(deltas[rnd][s], steps[rnd], rnd) for s in live}
        else:
            encs = {s: codecs[s].encode(deltas[rnd][s], rnd) for s in live}
            mean = codecs[live[0]].mean({s: encs[s].row for s in live})
            outs = {s: codecs[s].step(encs[s], mean) for s in live}
            assert all(torch.equal(outs[s], outs[live[0]]) for s in live)
            steps[rnd] = outs[live[0]]
        for s in live:
            codecs[s].commit(encs[s])
            codecs[s].live = list(live)
    sent = {}
    for s in range(3):
        w, b = deltas[3][s].split(sizes)
        sent[s] = torch.cat([comp.decompress(comp.compress(w, step=segment_step(3, "w"))), b])
    assert torch.equal(steps[3], slot_order_mean(sent, [0, 1, 2]))
    assert steps[3].norm() < 0.2 * steps[2].norm()

def same_replica(a, b) -> None:
    assert a.round == b.round
    assert a.consensus_digest() == b.consensus_digest()
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)
    common = set(a.losses) & set(b.losses)
    assert common and all(a.losses[t] == b.losses[t] for t in common)


@pytest.mark.parametrize("sync", [pytest.param("local", marks=pytest.mark.extended), "diloco"])  # ~5 s each
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


# -- thinwire-train elastic=torchft comm=chunk_topk (processes) --------------------------------
def sync_state(path) -> dict:
    """The outer loop's anchor and outer-optimizer state in a checkpoint file, by parameter order."""
    state = torch.load(path, weights_only=False)["sync"]
    anchor = state["anchor"]
    anchor = list(anchor.values()) if isinstance(anchor, dict) else list(anchor)
    return {"anchor": anchor, "outer": state["outer"]}


@pytest.mark.extended  # two runs: ~35 s (ordinary, 3 ranks) + ~70 s (elastic, a restart): 100-120 s at load ~10
@pytest.mark.parametrize("sync, comm", [("local", ["comm=chunk_topk"]), ("diloco", ["comm=chunk_topk"]),
                                        ("diloco", ["comm=topk", "comm.feedback=ef21"])],
                         ids=["local-chunk_topk-ef", "diloco-chunk_topk-ef", "diloco-topk-ef21"])
def test_killed_slot_with_compressed_deltas_equals_the_planned_absence(torchft_only, tmp_path, sync, comm):
    """3 slots, ``comm=chunk_topk`` (SparseLoCo's compressor, error feedback) or ``comm=topk`` with
    EF21: slot 2 SIGKILLed after step 10 (mid round 2), restarted by the launcher, healed with
    residual 0 (EF21: a dense round when it left and one when it is back). Equals, bitwise, the
    ordinary 3-rank run with slot 2 planned absent for the rounds the tape recorded (its residual
    dropped at its first absent round): slot 0's loss at every step, the round lines, every slot's
    final parameters, anchor and outer state; the tape's live sets and heals are the plan's."""
    from test_elastic_trainer import H, ckpt, params, rows, same, steps, tape_of, thinwire_train

    from thinwire.elastic.tape import planned

    n = 64
    args = [*steps(n), f"sync={sync}", "dist.nproc=3", *comm]
    run, ref = tmp_path / "el", tmp_path / "ref"
    thinwire_train(run, *args, "trainer.faults.step_sleep_s=0.3", "trainer.faults.rank=2", "trainer.faults.kill_at=10",
                   "elastic.min_replicas=2", elastic=True)
    tape = tape_of(run)
    live = tape.live_sets()
    absent = [r for r, ls in enumerate(live) if 2 not in ls]
    assert absent and absent[0] == 2 and absent == list(range(2, absent[-1] + 1)), live
    assert absent[-1] < n // H - 1, live  # it came back
    plan = planned(3, n // H, {2: (2, absent[-1])})
    assert live == plan.live_sets() and [e["healed"] for e in tape.rounds] == [e["healed"] for e in plan.rounds]
    residual = [r for r in tape.lost if r.get("reason") == "residual"]
    assert [(r["slot"], r["round"]) for r in residual] == [(2, 2)]
    assert (residual[0]["residual_norm"] > 0) == ("comm.feedback=ef21" not in comm)  # EF21 keeps no residual
    thinwire_train(ref, *args, f'trainer.faults.absent_at="2:2..{absent[-1]}"', elastic=False)
    el, want = rows(run / "slot0" / "metrics.jsonl"), rows(ref / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in el] == [(r["step"], r["loss"]) for r in want]  # slot 0, every step
    got = [r for r in rows(run / "metrics.jsonl") if "live_slots" in r]
    want = [r for r in want if "live_slots" in r]
    assert [(r["live_slots"], r["lost_steps"]) for r in got] == [(r["live_slots"], r["lost_steps"]) for r in want]
    for s in range(3):
        assert same(params(ckpt(run, s, n, True)), params(ckpt(ref, s, n, False))), s
        a, b = sync_state(ckpt(run, s, n, True)), sync_state(ckpt(ref, s, n, False))
        assert all(torch.equal(x, y) for x, y in zip(a["anchor"], b["anchor"])) and len(a["anchor"]) == len(b["anchor"])
        assert state_equal(a["outer"], b["outer"]), s
    assert all(r["elastic_row_bytes"] < 4 * sum(p.numel() for p in params(ckpt(run, 0, n, True)).values())
               for r in got)


@pytest.mark.extended  # three elastic runs, ~60 s each at load average ~10
def test_full_slot_resume_with_compressed_deltas_equals_the_uninterrupted_run(torchft_only, tmp_path):
    """2 slots, ``comm=chunk_topk`` + ef: every slot stops at step 10 (mid round 2) with its
    checkpoint (its residual with it); ``trainer.resume=auto`` continues bitwise."""
    from test_elastic_trainer import ckpt, params, rows, same, steps, thinwire_train

    n, args = 20, [*steps(20), "sync=diloco", "dist.nproc=2", "comm=chunk_topk"]
    thinwire_train(tmp_path / "full", *args, elastic=True)
    thinwire_train(tmp_path / "split", *args, "trainer.stop_after=10", elastic=True)
    thinwire_train(tmp_path / "split", *args, "trainer.resume=auto", elastic=True)
    key = ("step", "loss", "live_slots", "lost_steps", "residual_norm", "val_loss")
    full, split = (rows(tmp_path / d / "metrics.jsonl") for d in ("full", "split"))
    assert [[r.get(k) for k in key] for r in split] == [[r.get(k) for k in key] for r in full]
    assert any(r.get("residual_norm", 0) > 0 for r in full)
    for s in (0, 1):
        assert same(params(ckpt(tmp_path / "split", s, n, True)), params(ckpt(tmp_path / "full", s, n, True))), s


def state_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def torchft_only():
    from test_elastic import need_torchft

    need_torchft()


@pytest.mark.parametrize("overrides, line", [
    (["comm=int8"], "comm=int8: elastic=torchft: compressed pseudo-gradients have a joiner rule"),
    (["comm=chunk_topk", "comm.feedback=ef21"], "comm.feedback=ef21: elastic=torchft: comm=chunk_topk has a joiner "
                                                "rule for comm.feedback=ef | none only"),
    (["comm=topk", "comm.feedback=econtrol"], "comm.feedback=econtrol: elastic=torchft: comm=topk has a joiner rule"),
    (["comm=topk", "comm.feedback=ef21", "comm.init=zero"], "comm.init=zero: elastic=torchft: elastic EF21 takes a dense round"),
    (["comm=chunk_topk", "comm.collective=two_phase"], "comm.collective=two_phase: elastic=torchft: two_phase "
                                                       "keeps server residuals"),
    (["elastic=none", "comm=topk", "comm.feedback=econtrol", 'trainer.faults.absent_at="1:0..0"'],
     "trainer.faults.absent_at=1:0..0: comm.feedback=econtrol: a compressed mean under a planned absence: comm=topk"),
])
def test_what_stays_refused_is_one_line_exit_2(capsys, overrides, line):
    from conftest import cli_error
    from test_elastic import need_torchft
    from test_elastic_trainer import BASE, steps

    need_torchft()
    code, err = cli_error(capsys, *BASE, *steps(8), "sync=local", "dist.nproc=3", "elastic=torchft", *overrides)
    assert code == 2 and line in err, err
