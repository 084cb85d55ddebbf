"""The membership tape and its single-process replay (the reference of the elastic tests).

Records (one JSON object per line, as each replica writes them; ``kind``):
- ``round``: a committed round, written by each contributor: ``round``, ``live_replicas``,
  ``live_slots`` (the contributors, whose mean was taken), ``healed`` ({slot: source slot}:
  stale replicas that received the consensus state after this round's step), ``retries``,
  ``stall_s``, ``digest`` (the consensus state after the step), ``nonfinite`` (the slots whose
  non-finite pseudo-gradient skipped the round everywhere, when any);
- ``lost``: a slot's trained steps that entered no mean (a stale round): ``slot``, ``round``,
  ``steps`` [first, last];
- ``healed``: a replica took a peer's consensus state (``slot``, ``round``, ``digest``).

:func:`replay` recomputes the run from the tape alone, in one process and without any
membership code: per round, every live slot trains its round from the anchor on its own
batches, the mean over the live slots is summed in slot order, every live slot takes the
outer step (unless a pseudo-gradient is non-finite: every live slot goes back to its
anchor, as the finiteness vote decides); a healed slot starts the next round from its source's consensus state with a
fresh inner optimizer. It checks each round's consensus digest on the way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .replica import Replica, ReplicaSpec


@dataclass
class Tape:
    rounds: list[dict] = field(default_factory=list)   # one per committed round, in order
    lost: list[dict] = field(default_factory=list)
    healed: list[dict] = field(default_factory=list)

    @classmethod
    def merge(cls, records: list[dict]) -> "Tape":
        """The tape from every replica's records; contributors of a round must agree."""
        by_round: dict[int, dict] = {}
        tape = cls()
        for r in records:
            if r["kind"] == "round":
                key = {k: r[k] for k in ("round", "live_replicas", "live_slots", "healed", "digest", "nonfinite")
                       if k in r}
                seen = by_round.setdefault(r["round"], dict(key, retries=0, stall_s=0.0))
                if {k: seen[k] for k in key} != key:
                    raise AssertionError(f"replicas disagree on round {r['round']}: {seen} vs {key}")
                seen["retries"] = max(seen["retries"], r.get("retries", 0))   # per writer: the most
                seen["stall_s"] = max(seen["stall_s"], r.get("stall_s", 0.0))
            elif r["kind"] == "lost":
                tape.lost.append(r)
            elif r["kind"] == "healed":
                tape.healed.append(r)
        tape.rounds = [by_round[k] for k in sorted(by_round)]
        if [e["round"] for e in tape.rounds] != list(range(len(tape.rounds))):
            raise AssertionError(f"rounds missing from the tape: {sorted(by_round)}")
        return tape

    @classmethod
    def read(cls, paths: list[str]) -> "Tape":
        records = []
        for p in paths:
            with open(p) as f:
                records += [json.loads(line) for line in f if line.strip()]
        return cls.merge(records)

    def live_sets(self) -> list[list[int]]:
        return [e["live_slots"] for e in self.rounds]

    def untrained(self, nominal: int, local_steps: int) -> list[tuple[int, int, int]]:
        """Every (slot, first step, last step) whose batches entered no mean: the rounds a
        slot was not live in (dead, late, joining) and the rounds a non-finite pseudo-gradient
        skipped, merged into ranges. Lost data is audited
        from the tape, not from the dead process (which cannot report its partial round)."""
        out: list[list[int]] = []
        for s in range(nominal):
            for e in self.rounds:
                if s in e["live_slots"] and not e.get("nonfinite"):  # a skipped round: no slot's batches count
                    continue
                first, last = e["round"] * local_steps, (e["round"] + 1) * local_steps - 1
                if out and out[-1][0] == s and out[-1][2] == first - 1:
                    out[-1][2] = last
                else:
                    out.append([s, first, last])
        return [tuple(x) for x in out]


def planned(nominal: int, rounds: int, absent: dict) -> Tape:
    """The tape of a fault-free run with planned absences (``absent``: slot -> (first, last)
    round, as ``trainer.faults.absent_at="SLOT:FIRST..LAST"``): the slot is live in no round of
    that range and heals from the lowest live slot after the last one (no digests: replay it
    with ``check_digests=False``)."""
    tape = Tape()
    for r in range(rounds):
        live = [s for s in range(nominal) if not (s in absent and absent[s][0] <= r <= absent[s][1])]
        healed = {str(s): live[0] for s, (a, b) in sorted(absent.items()) if b == r and r + 1 < rounds}
        tape.rounds.append({"round": r, "live_replicas": len(live), "live_slots": live, "healed": healed,
                            "digest": None, "retries": 0, "stall_s": 0.0})
    return tape


def replay(spec: ReplicaSpec, tape: Tape, check_digests: bool = True, make_replica=None) -> dict[int, Replica]:
    """The reference: the slots' replicas after the tape's rounds, recomputed in one process.
    Returns the replicas live at the end (slot -> Replica); ``make_replica(slot, joiner)`` as
    in ``simulator.simulate``."""
    make_replica = make_replica or (lambda slot, joiner: Replica(spec, slot, joiner=joiner))
    reps: dict[int, Replica] = {}
    for i, entry in enumerate(tape.rounds):
        R, live = entry["round"], entry["live_slots"]
        for s in live:
            if R == 0:
                if s not in reps:
                    reps[s] = make_replica(s, False)
            if s not in reps or reps[s].round != R:
                raise AssertionError(f"round {R}: slot {s} is live but neither continued nor healed")
        deltas = {}
        for s in live:
            rep = reps[s]
            for t in rep.steps_of(R):
                rep.train_step(t)
            deltas[s] = rep.pseudo_gradient()
        nonfinite = [s for s in live if not torch.isfinite(deltas[s]).all()]
        if nonfinite != entry.get("nonfinite", []):
            raise AssertionError(f"round {R}: non-finite pseudo-gradients of slots {nonfinite}, the tape says "
                                 f"{entry.get('nonfinite', [])}")
        if nonfinite:  # skipped everywhere: back to the anchor, no outer step
            for s in live:
                reps[s].restart_round()
                reps[s].round += 1
        else:
            acc = deltas[live[0]].clone()
            for s in live[1:]:
                acc += deltas[s]
            mean = acc / len(live)
            for s in live:
                reps[s].apply_mean(mean)
        if check_digests and reps[live[0]].consensus_digest() != entry["digest"]:
            raise AssertionError(f"round {R}: consensus digest differs from the tape")
        nxt = {s: reps[s] for s in live}
        for s, src in entry["healed"].items():
            joiner = make_replica(int(s), True)
            joiner.heal(reps[src].consensus_state())
            nxt[int(s)] = joiner
        reps = nxt
    return reps
