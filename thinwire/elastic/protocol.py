"""The elastic round: local steps, then the round's sync over a membership, retried with the
survivors until it commits.

One sync, on every replica in the quorum (``ElasticRunner.sync``)::

    quorum            membership.quorum(): the lighthouse's live set, a fresh process group
    header            all-reduce of an N x 7 matrix, row = slot: (present, round, has delta,
                      rank in the group, consensus digest as two exact 32-bit words, Delta
                      finite): every member learns the live set, its rounds and its votes
    contributors      the present slots at the highest round R that have a pseudo-gradient;
                      the others (a joiner, a late replica with a stale round) are *stale*:
                      they sit the round out (a stale round's steps are logged as lost)
    drift guard       the contributors' consensus digests (anchor, outer state, round: the state
                      round R starts from, i.e. round R-1's commit or a heal) must be equal;
                      otherwise every member stops with one line naming the slots
                      (:class:`LiveDriftError`, as the non-elastic guard stops: a hash, not a
                      tolerance, and no heal: which copy is right is unknown)
    finiteness vote   a non-finite Delta of any contributor skips the round everywhere, as the
                      non-elastic ``sync=local`` does: nothing is sent, every contributor
                      restarts from its anchor (parameters := anchor, no outer step), round + 1
    data              all-reduce of an N x n matrix whose row s is slot s's Delta (zeros
                      elsewhere): exact, so the live mean summed in slot order is the same
                      whatever order the collective adds in
    commit            membership.should_commit() (torchft's vote); no commit: the same round
                      is retried from the same Delta with the new quorum (no local work lost)
    outer step        contributors: a <- OuterOpt(a, mean over contributors); w <- a
    heal              stale replicas receive the consensus state (anchor, outer state, round)
                      from the lowest contributing slot by digest: JSON schema + per-tensor
                      digests, then only the tensors some stale replica lacks (no pickle);
                      parameters = anchor, inner optimizer fresh

Each contributor appends the committed round to its tape: ``{"round", "live_slots", "healed"
{slot: source}, "retries", "digest"}`` (the consensus digest after the step), and
``"nonfinite": [slots]`` for a round skipped by the finiteness vote.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable, Optional

import torch

from ..comm.accounting import collective_bytes
from ..errors import ReplicaDriftError
from .launch import DRIFT_EXIT
from .replica import Replica
from .state import digest, layout, signed64, templates, tensor_digests

HEADER = 7  # present, round, has delta, rank, digest high 32 bits, digest low 32 bits, Delta finite


class MembershipError(RuntimeError):
    """A collective or quorum failed: the round is retried with a new quorum."""


class LiveDriftError(ReplicaDriftError):
    """The live contributors of a round start it from different consensus states: every member
    stops (exit status ``DRIFT_EXIT``), no slot is restarted."""
    exit_code = DRIFT_EXIT


def digest_words(digest: str) -> tuple[float, float]:
    """A 64-bit hex digest as two 32-bit words, each exact in float64 (a row of the header
    all-reduce has one non-zero addend per element, so the sum carries it unchanged)."""
    v = int(digest[:16], 16)
    return float(v >> 32), float(v & 0xFFFFFFFF)


def check_live_drift(header: torch.Tensor, contributors: list[int], rnd: int) -> None:
    """Raise :class:`LiveDriftError` unless every contributor's digest (header columns 4-5) is
    equal; the slots that differ from the majority (or from the lowest slot, without one)."""
    words = {s: (int(header[s, 4]), int(header[s, 5])) for s in contributors}
    if len(set(words.values())) <= 1:
        return
    counts = Counter(words.values())
    top, n = counts.most_common(1)[0]
    ref = top if n > len(contributors) // 2 else words[contributors[0]]
    odd = [s for s in contributors if words[s] != ref]
    ref_slot = next(s for s in contributors if words[s] == ref)
    hexd = {s: f"{(w[0] << 32) | w[1]:016x}" for s, w in words.items()}
    raise LiveDriftError(
        f"replica drift over the live set at round {rnd}: the consensus state (anchor, outer state, round) of "
        f"slot{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd))} differs from slot {ref_slot}'s "
        f"(digests {', '.join(hexd[s] for s in odd)} vs {hexd[ref_slot]}); the replicas no longer train one "
        f"model: resume from a checkpoint written before round {rnd}")


def live_mean(rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """The mean of the live slots' pseudo-gradients, summed in slot order (fp32)."""
    slots = sorted(rows)
    acc = rows[slots[0]].clone()
    for s in slots[1:]:
        acc += rows[s]
    return acc / len(slots)


class NoFaults:
    def in_training(self, slot: int, rnd: int, step: int) -> None: ...

    def before_sync(self, slot: int, rnd: int) -> None: ...

    def before_data(self, slot: int, rnd: int) -> None: ...


class ElasticRunner:
    """Slot ``replica.slot``'s round loop over ``membership`` until ``rounds`` rounds are
    committed. ``log(record)`` receives the tape records (dicts) as they happen."""

    def __init__(self, replica: Replica, membership, rounds: int, *, min_replicas: int = 1,
                 faults=None, log: Optional[Callable[[dict], None]] = None):
        self.replica, self.m, self.rounds = replica, membership, rounds
        self.min_replicas = min_replicas
        self.retry_sleep_s = 0.05
        self.faults = faults or NoFaults()
        self.records: list[dict] = []
        self.residual_sq: dict[int, float] = {}   # compressed exchange: each contributor's last residual norm^2
        self.data_bytes = 0                       # this slot's bytes in the last data collective (ring all-reduce)
        self._log = log

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self._log is not None:
            self._log(record)

    def run(self) -> Replica:
        rep = self.replica
        while rep.round < self.rounds:
            delta = None
            if rep.round >= 0:
                rnd = rep.round
                for t in rep.steps_of(rnd):
                    self.faults.in_training(rep.slot, rnd, t)
                    rep.train_step(t)
                delta = (rnd, rep.pseudo_gradient())
            self.sync(delta)
        return rep

    def sync(self, delta) -> None:
        rep, m, N = self.replica, self.m, self.replica.spec.nominal
        retries, lost_logged, t0 = 0, False, time.monotonic()
        if hasattr(self.faults, "before_sync"):
            self.faults.before_sync(rep.slot, rep.round)
        # this slot's votes, the same in every try of the round: its consensus digest, Delta finite
        votes = [*digest_words(rep.consensus_digest()),
                 float(delta is None or bool(torch.isfinite(delta[1]).all()))]
        while True:
            try:
                m.quorum(max(rep.round, 0))
                header = torch.zeros(N, HEADER, dtype=torch.float64)
                header[rep.slot] = torch.tensor([1.0, rep.round, float(delta is not None), m.rank(), *votes],
                                                dtype=torch.float64)
                m.allreduce_sum(header)
                present = [s for s in range(N) if header[s, 0] == 1]
                R = int(max(header[s, 1] for s in present))
                contributors = [s for s in present if int(header[s, 1]) == R and header[s, 2] == 1]
                stale = [s for s in present if s not in contributors]
                if not contributors or len(contributors) < self.min_replicas:
                    raise MembershipError(f"round {R}: live slots {contributors} below min_replicas={self.min_replicas}")
                check_live_drift(header, contributors, R)
                nonfinite = [s for s in contributors if header[s, 6] == 0]
                mine = rep.slot in contributors
                if delta is not None and not mine and not lost_logged:
                    steps = rep.steps_of(delta[0])
                    self.log({"kind": "lost", "slot": rep.slot, "round": delta[0],
                              "steps": [steps.start, steps.stop - 1], "reason": "stale round"})
                    lost_logged = True
                mean, sent, rows = None, None, {}  # a non-finite Delta: the round is skipped everywhere, nothing is sent
                self.data_bytes = 0
                if not nonfinite:
                    mean, sent, rows = self.data_phase(delta, mine, contributors, R, len(present))
                if not m.should_commit():
                    raise MembershipError(f"round {R}: commit vote failed")
            except MembershipError as e:
                m.report_error(e)
                retries += 1
                if self.m.timed_out(time.monotonic() - t0):
                    raise MembershipError(f"slot {rep.slot}: no round committed within the quorum timeout "
                                          f"after {retries} tries; last: {e}") from None
                time.sleep(self.retry_sleep_s)
                continue
            source = contributors[0]
            self.residuals(sent, rows, contributors, R, mine and rep.slot == source)
            if mine:
                if nonfinite:
                    rep.restart_round()
                    rep.round += 1
                else:
                    rep.apply_mean(mean)
                self.log({"kind": "round", "round": R, "live_replicas": len(contributors),
                          "live_slots": contributors, "healed": {str(s): source for s in stale},
                          "retries": retries, "stall_s": round(time.monotonic() - t0, 3),
                          "data_bytes": self.data_bytes, "digest": rep.consensus_digest(),
                          **({"nonfinite": nonfinite} if nonfinite else {})})
            if stale:
                try:
                    self.heal_phase(int(header[source, 3]), rep.slot == source, not mine)
                except MembershipError as e:  # the round is committed; a stale replica heals next time
                    m.report_error(e)
                    if not mine:
                        continue
            if mine or rep.round > R:
                return

    def data_phase(self, delta, mine: bool, contributors: list[int], R: int, present: int):
        """The round's data collective and its live mean: (what the outer step takes, this slot's
        staged feedback step or None, the compressed rows or {}). Dense (``comm=none``, a warm-up
        round, EF21's round after a change, voted on by the contributors first: a stale member does
        not know the last live set): an N x n fp32 all-reduce, row = slot; compressed
        (``replica.exchange``, ``thinwire.elastic.exchange``): an N x B uint8 all-reduce of the
        contributors' payload rows. Either way each element has one non-zero addend, so the mean,
        summed in slot order, does not depend on the collective's order."""
        rep, N, ex = self.replica, self.replica.spec.nominal, self.replica.exchange
        dense, vote_bytes = ex is None or ex.dense(R, contributors), 0
        if ex is not None and ex.feedback.dense_init:  # EF21: only the contributors know the last live set
            vote = torch.zeros(N, dtype=torch.float64)
            vote[rep.slot] = float(mine and dense)
            vote_bytes = collective_bytes("all_reduce", N, 8, present)
            self.m.allreduce_sum(vote)
            dense = bool(vote.sum() > 0)
        enc = None
        if dense:
            data = torch.zeros(N, sum(rep.space.sizes))
            if mine:
                data[rep.slot] = delta[1]
        else:
            data = torch.zeros(N, ex.row_bytes, dtype=torch.uint8)
            if mine:
                enc = ex.encode(delta[1], R)
                data[rep.slot] = enc.row
        self.data_bytes = vote_bytes + collective_bytes("all_reduce", data.numel(), data.element_size(), present)
        self.faults.before_data(rep.slot, R)
        self.m.allreduce_sum(data)
        rows = {s: data[s] for s in contributors}
        mean = live_mean(rows) if dense else ex.mean(rows)
        if ex is None or not mine:
            return mean, None, {} if dense else rows
        if dense:
            return mean, ex.dense_step(delta[1], mean, R), {}
        return ex.step(enc, mean), enc, rows

    def residuals(self, staged, rows, contributors: list[int], R: int, writer: bool) -> None:
        """After a committed round (compressed exchange only): this slot's feedback step, the
        contributors' residual norms (their rows' trailers), the round's contributors (EF21's next
        round is dense when they change), and, written by the round's source, a ``lost`` record
        (``reason: residual``) for each slot that contributed to the last round this slot took part
        in and does not to this one (dead, late or stale): the norm of the residual it takes out of
        the mean (its steps are audited by the round records)."""
        ex = self.replica.exchange
        if ex is None:
            return
        if staged is not None:
            ex.commit(staged)
        self.residual_sq.update({s: ex.residual_sq(row) for s, row in rows.items()})
        if writer:
            for s in ex.live or []:
                if s not in contributors:
                    self.log({"kind": "lost", "slot": s, "round": R, "reason": "residual",
                              "residual_norm": self.residual_sq.get(s, 0.0) ** 0.5})
        ex.live = list(contributors)

    def heal_phase(self, src_rank: int, is_source: bool, receive: bool) -> None:
        """Heal by digest: the source broadcasts its schema (JSON) and its consensus digest plus
        one 64-bit digest per tensor (int64, exact); each receiver marks the tensors it lacks
        (all of them when its layout differs, e.g. a fresh joiner without outer state); one
        all-reduce of the need mask (the source and the contributors add zeros) gives their union,
        and only those tensors are broadcast. A receiver keeps its own copy of every other tensor
        (equal by digest) and must end on the source's consensus digest."""
        rep, m = self.replica, self.m
        schema, tensors, raw, digests = None, None, None, None
        if is_source:
            schema, tensors = rep.pack_consensus()
            raw = torch.tensor(list(schema.encode()), dtype=torch.uint8)
            digests = torch.tensor([signed64(digest(tensors, schema)), *tensor_digests(tensors)], dtype=torch.int64)
        sizes = torch.tensor([raw.numel(), len(tensors)] if is_source else [0, 0], dtype=torch.int64)
        m.broadcast(sizes, src_rank)
        if not is_source:
            raw = torch.zeros(int(sizes[0]), dtype=torch.uint8)
            digests = torch.zeros(int(sizes[1]) + 1, dtype=torch.int64)
        m.broadcast(raw, src_rank)
        m.broadcast(digests, src_rank)
        schema = bytes(raw.tolist()).decode()
        need = torch.zeros(int(sizes[1]), dtype=torch.int64)
        own = None
        if receive:
            own_schema, own = rep.pack_consensus()
            if layout(own_schema) == layout(schema):
                need = (torch.tensor(tensor_digests(own), dtype=torch.int64) != digests[1:]).to(torch.int64)
            else:
                need.fill_(1)
        m.allreduce_sum(need)
        sent = [i for i in range(len(need)) if need[i] > 0]
        if tensors is None:
            tensors = templates(schema)
        for i in sent:
            m.broadcast(tensors[i], src_rank)
        if receive:
            state = rep.unpack_consensus(schema, [t if need[i] > 0 else own[i] for i, t in enumerate(tensors)])
            rep.heal(state)
            healed = rep.consensus_digest()
            if signed64(healed) != int(digests[0]):  # a broken transfer: heal again at the next round
                raise MembershipError(f"slot {rep.slot}: healed digest {healed} is not the source's")
            nbytes = [t.numel() * t.element_size() for t in tensors]
            self.log({"kind": "healed", "slot": rep.slot, "round": rep.round, "source_rank": src_rank,
                      "digest": healed, "tensors_sent": len(sent), "tensors_skipped": len(tensors) - len(sent),
                      "bytes_sent": sum(nbytes[i] for i in sent),
                      "bytes_skipped": sum(nbytes) - sum(nbytes[i] for i in sent)})
