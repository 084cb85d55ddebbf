"""Compressed pseudo-gradients with error feedback over a live set, exact whatever the
collective's order: the data phase of ``elastic=torchft`` (``protocol.ElasticRunner``) and of
its reference, the planned absence (``absence.LiveRows``), under ``comm=chunk_topk|topk``.

Each contributor s compresses its message (q_s = Delta_s + e_s under ``ef``; Delta_s - g_s under
``ef21``: the trainer's own rule, ``thinwire.comm.feedback``) with the trainer's own compressor, parameter by
parameter as the ordinary outer all-reduce does (``thinwire.comm.aggregator``: a parameter under
``comm.min_numel`` travels as fp32, the compressor's step is ``collectives.segment_step``), and
packs the payloads into one byte row of a size fixed by the model's shapes. The rows travel as an
N x B uint8 all-reduce, row = slot, zeros elsewhere: every byte has one non-zero addend, so every
member receives every contributor's bytes exactly. The mean is decoded from the contributors' rows
in slot order: ``collectives.sparse_mean`` (the sparse all-gather's own decoding: the sum in the
given order, divided by the contributors, or per coordinate by the contributors that sent it for
``mean=contributors``, SparseLoCo, arXiv 2508.15706, Algorithm 1) for the compressed parameters,
a slot-order fp32 sum divided by the contributors for the dense ones. Only contributors take the
feedback step (ef: e_s <- q_s - C(q_s); ef21: g_s += C(q_s), G += the mean, the outer step takes
G), and only once the round commits. EF21 has dense rounds (``RowCodec.dense``): the warm-up
(g_i = Delta_i, G = the mean, as the ordinary run initialises it), and the first round of every
new set of contributors, whose exact mean the outer step takes once, after which EF21 restarts
from g_i = G = 0 (arXiv 2106.05203, Alg. 1 with g_i^0 = 0; ``RowCodec.restarts``). Setting
g_i = Delta_i, G = the mean there instead made the next round's G the change round's mean plus a
Top-K correction, so the outer step applied that round's displacement a second time (val loss
7.26 against 3.33 without the absence, docs/elastic.md).

Each row ends with 8 bytes: the sender's residual norm^2 after this round (fp64), so the live set
knows the norm of the residual a slot takes with it when it leaves (the tape's ``lost`` record).

Bytes: a ring all-reduce of the N x B matrix over p live members costs each member
2 (p-1)/p * N * B bytes, against (p-1) * B for an all-gather of the rows (the ordinary sparse
collective): 2N/p times as many, 2x with every slot live. The all-reduce is what the membership
interface offers over torchft's process group (``Membership.allreduce_sum``), and its result does
not depend on who is live.
"""
from __future__ import annotations

import math

import torch

from ..comm import collectives
from ..comm.aggregator import CompressedAggregator
from ..comm.compressors import Payload

FEEDBACKS = ("ef", "none", "ef21")   # with a joiner rule: residual 0 (ef), a dense round after a change (ef21)
TRAILER = 8                    # the residual norm^2 (fp64) after each row's payloads


class Encoded:
    """One contributor's round: its byte row, and per parameter (Delta, q, C(q)) for the feedback
    step once the mean is known (``step``)."""

    def __init__(self, row: torch.Tensor, parts: list[tuple]):
        self.row, self.parts, self.staged = row, parts, {}


class RowCodec:
    """The codec of one model's pseudo-gradient (``names``/``sizes``: the flat vector's
    parameters) for ``comm_cfg`` (a comm config: its name and fields, as ``comm=...`` gives them);
    it owns the sender's feedback buffers (``state_dict``/``reset``), or uses ``feedback``'s.
    ``live``: the contributors of the last round this slot took part in (EF21's dense rounds)."""

    def __init__(self, comm_cfg: dict, names: list[str], sizes: list[int], feedback=None):
        fields = dict(comm_cfg)
        self.name = fields.pop("name")
        agg = CompressedAggregator(self.name, fields, meter=None)
        if fields.get("feedback", "none") not in FEEDBACKS:
            raise ValueError(f"comm.feedback={fields.get('feedback')}: the live-row exchange takes "
                             f"{' or '.join(FEEDBACKS)}")
        self.compressor, self.min_numel = agg.compressor, agg.min_numel
        self.feedback = feedback if feedback is not None else agg.feedback   # feedback: buffers kept elsewhere
        self.warmup_rounds = int(fields.get("warmup_steps", 0))
        self.names, self.sizes = list(names), list(sizes)
        self.live: list[int] | None = None
        self.templates: list[Payload | None] = []
        self.widths: list[int] = []
        for n, size in zip(self.names, self.sizes):
            if size >= self.min_numel:
                pl = self.compressor.compress(torch.zeros(size), step=0)
                self.templates.append(pl)
                self.widths.append(pl.nbytes)
            else:
                self.templates.append(None)
                self.widths.append(4 * size)
        self.row_bytes = sum(self.widths) + TRAILER

    def dense(self, rnd: int, contributors: list[int]) -> bool:
        """Round ``rnd`` travels as exact fp32 rows: a warm-up round (``comm.warmup_steps``), or,
        for a rule that starts from a dense round (EF21), the first round of every new set of
        contributors (``dense_step``: its buffers after)."""
        return rnd < self.warmup_rounds or (self.feedback.dense_init and list(contributors) != self.live)

    # -- the sender ---------------------------------------------------------------------
    def encode(self, delta: torch.Tensor, rnd: int) -> Encoded:
        fb, rows, parts, res_sq = self.feedback, [], [], 0.0
        for n, g, tmpl in zip(self.names, delta.detach().float().split(self.sizes), self.templates):
            q = fb.message(n, g)
            if tmpl is not None:
                pl = self.compressor.compress(q, step=collectives.segment_step(rnd, n))
                sent = self.compressor.decompress(pl)
                rows.append(collectives.pack(pl))
            else:
                sent = q
                rows.append(q.contiguous().view(torch.uint8).clone())
            parts.append((n, g, q, sent))
            res_sq += fb.residual_sq(fb.result(n, g, q, sent, torch.zeros_like(g))[1])  # ef: |q - C(q)|^2
        rows.append(torch.tensor([res_sq], dtype=torch.float64).view(torch.uint8))
        return Encoded(torch.cat(rows), parts)

    def step(self, enc: Encoded, mean: torch.Tensor) -> torch.Tensor:
        """The feedback step of a compressed round: what the outer optimizer takes (ef: the mean;
        EF21: G + the mean), the new buffers staged in ``enc`` until the round commits."""
        out = []
        for (n, g, q, sent), m in zip(enc.parts, mean.split(self.sizes)):
            o, enc.staged[n] = self.feedback.result(n, g, q, sent, m)
            out.append(o)
        return torch.cat(out)

    def idle(self) -> Encoded:
        """What a slot that sends nothing feeds into ``step`` (Delta = q = C(q) = 0 per parameter):
        the shared part of the step (EF21's G += mean) without a message of its own."""
        zero = [torch.zeros(n) for n in self.sizes]
        return Encoded(torch.empty(0, dtype=torch.uint8), [(n, z, z, z) for n, z in zip(self.names, zero)])

    def dense_step(self, delta: torch.Tensor, mean: torch.Tensor, rnd: int) -> Encoded:
        """The buffers after dense round ``rnd`` (the outer step takes its exact mean). A warm-up
        round: EF21's g_i = Delta_i, G = the mean, as in the ordinary run; the round of a change
        (``restarts``): EF21 restarts from g_i = G = 0 over the new contributors. ef: unchanged."""
        enc = Encoded(torch.empty(0, dtype=torch.uint8), [])
        zero = self.restarts(rnd)
        for n, g, m in zip(self.names, delta.detach().float().split(self.sizes), mean.split(self.sizes)):
            bufs = self.feedback.dense(n, g, m)
            enc.staged[n] = {k: torch.zeros_like(v) for k, v in bufs.items()} if zero else bufs
        return enc

    def restarts(self, rnd: int) -> bool:
        """A dense round ``rnd`` past the warm-up is a change's: EF21 restarts from g_i^0 = 0,
        G^0 = 0 (arXiv 2106.05203, Alg. 1 with the zero start), so that the next round's step is
        mean_i C(Delta_i), not the change round's mean a second time (G = the mean + a Top-K
        correction: the outer step would apply the change round's displacement twice)."""
        return rnd >= self.warmup_rounds

    def commit(self, enc: Encoded) -> None:
        """The round committed: the sender's residual is the one its row was encoded with."""
        self.feedback.commit(enc.staged)

    def residual_norm(self) -> float:
        return math.sqrt(sum(self.feedback.residual_sq(bufs) for bufs in self.feedback.store.values()))

    def reset(self) -> float:
        """The joiner rule: residual 0 (EF21: g_i and G go too; the next round is dense). Returns
        the norm of the residual dropped (logged as lost)."""
        lost = self.residual_norm()
        self.feedback.store = {}
        return lost

    def state_dict(self) -> dict:
        return {"feedback": self.feedback.state_dict(), "live": self.live}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.load_state_dict(state.get("feedback", {}))
        self.live = state.get("live")

    # -- every member ---------------------------------------------------------------------
    def mean(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """The mean over the contributors whose rows are given, summed in slot order (fp32)."""
        slots = sorted(rows)
        p, out, off = len(slots), [], 0
        for size, width, tmpl in zip(self.sizes, self.widths, self.templates):
            pieces = [rows[s][off:off + width] for s in slots]
            if tmpl is not None:
                payloads = [collectives.unpack(b, tmpl) for b in pieces]
                out.append(collectives.sparse_mean(self.compressor, payloads, size, p, torch.device("cpu")))
            else:
                acc = pieces[0].clone().view(torch.float32)
                for b in pieces[1:]:
                    acc += b.clone().view(torch.float32)
                out.append(acc.div_(p))
            off += width
        return torch.cat(out)

    @staticmethod
    def residual_sq(row: torch.Tensor) -> float:
        """The sender's residual norm^2 after the round (its row's trailer)."""
        return float(row[-TRAILER:].clone().view(torch.float64)[0])
