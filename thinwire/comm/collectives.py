"""Collectives: every rank's tensors -> their mean over the ranks, through a compressor.

One call aggregates a list of 1-D tensors ("segments"), each compressed on its own, in ONE
collective. The segments are the parameters of one DDP bucket (or of a whole model, for the
outer all-reduce of local updates). Compressing per parameter rather than per bucket is what
makes the result independent of how DDP groups parameters into buckets: DDP runs its first
iteration on initial buckets and rebuilds them afterwards, so a restarted job sees different
buckets on its first step than the uninterrupted job did. Per-parameter compression (with
randomness keyed by parameter name, see ``segment_step``) gives the same bits either way,
which keeps resume bitwise exact; it is also the "layer-wise" Top-K / per-tensor scaling
that DGC and 8-bit schemes use. :func:`aggregate` / :func:`aggregate_async` are the same
code for one tensor (library use).

Three ways to aggregate, chosen by the compressor's algebra (summable payloads all-reduced
as PowerSGD's are, Vogels et al. 2019; sparse ones all-gathered, as in SparCML, Renggli et al.
2019; quantised ones by 1-bit Adam's two-phase compressed all-reduce, Tang et al. 2021, the
qgZ collective of ZeRO++, Wang et al. 2023, and DeepSpeed's ``compressed_allreduce``);
B = the compressed bytes of what one rank sends, p = the group size:

* ``allreduce`` (``compressor.summable``: none/fp16/bf16/randk): the payload tensors of every
  segment are concatenated, divided by p (before summing, as torch's ``fp16_compress_hook``
  does, so fp16 cannot overflow), summed by one ring all-reduce, split and decompressed.
  Bytes/rank 2 (p-1)/p * B.
* ``allgather`` (``compressor.sparse``: topk/ternary/chunk_topk): every rank's packed
  payloads (uniform size, one uint8 buffer) are all-gathered; every rank scatter-adds every
  rank's segments in fp32, in rank order, and divides by p - or, for a compressor with
  ``contributors_mean`` (chunk_topk's default, SparseLoCo), divides each coordinate by the
  number of ranks that sent it (:func:`sparse_mean`). Bytes/rank (p-1) * B - they grow with
  p, as the sparse all-gather must. Exact for every compressor, so also usable with
  quantisers (EF21 / EControl need every rank to receive exactly mean_i C(x_i)).
* ``two_phase`` (quantisers: int8/dynamic8/sign1; 1-bit Adam, Tang et al. 2021, Sec. 4;
  ZeRO++ qgZ): every segment is padded and split into p chunks, each compressed; chunk j
  of every segment goes to rank j in one ``all_to_all_single``; the owner decompresses and
  averages in fp32, optionally adds/refreshes its server-side error buffer, re-compresses,
  and one ``all_gather`` returns the chunks. Bytes/rank (p-1)/p * p B_c + (p-1) B_c =
  2 (p-1) B_c with B_c = compressed bytes of one chunk ~ n/p * bits/8: O(n), independent of
  p. Works for any compressor. For a compressor that selects per run (``chunk_topk``:
  ``owner_chunk``) ownership is by whole runs instead, the owner averages over the ranks
  that sent each coordinate if asked (SparseLoCo's ``mean=contributors``), re-selects k per
  run and keeps an owner-side residual; both phases are alltoallv (:func:`_two_phase_runs`).

Every collective goes through ``thinwire.comm.accounting`` so its bytes are charged. Who owns
which chunk or run, and the bytes of a call from shapes alone: ``thinwire.comm.ownership``.
``collective="auto"`` picks by the algebra; an override is allowed where it is correct
(allgather and two_phase work for any compressor); ``allreduce`` of a non-summable payload
raises ``ValueError``.

Async: :func:`launch` returns what this rank sent (decompressed: the error-feedback rules
need it) and a ``torch.futures.Future`` of the means. Phase 1 is launched at once
(async_op); for ``two_phase`` the second collective is launched from phase 1's completion
callback on ``group2`` - a process group of its own, so collectives launched from callbacks
never interleave with the ones the main thread issues on ``group`` - and in call order (a
:class:`Sequencer` owned by the caller: ``CompressedAggregator`` keeps one per second
group; a direct call without one shares a default per group object), so every rank issues them in the same order even when gloo completes
phase 1 of several buckets out of order. No callback ever calls ``wait()``.

``steps``: forwarded to ``compressor.compress`` (rand-k indices, stochastic rounding, sampled
top-k threshold); ``None`` uses the compressor's own call counter. In ``two_phase`` chunk j
is compressed with ``step * (p + 1) + j`` and the owner's re-compression with
``step * (p + 1) + p``.
"""
from __future__ import annotations

import threading
import weakref
import zlib

import torch
import torch.distributed as dist

from .accounting import WireMeter, all_gather_into, all_reduce, all_to_all_single, collective_bytes, group_size
from .compressors import Compressor, Payload
from .ownership import (chunk_numel, fit_residuals, owner_chunk, owner_offset,  # noqa: F401 (re-exported)
                        owner_ranges, two_phase_bytes)
from .futures import hold, on_done, then

COLLECTIVES = ("allreduce", "allgather", "two_phase")


# ----------------------------------------------------------------------------- helpers
class _Uncounted:
    """A meter that charges nothing: for a collective whose bytes were charged at launch."""

    def charge(self, nbytes: int, kind: str = "data", collective: str = "", group_size: int = 0) -> None:
        pass


UNCOUNTED = _Uncounted()


def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def contributors_mean(compressor: Compressor) -> bool:
    """Whether ``compressor`` asks the sparse all-gather for the mean over contributing ranks
    (``Compressor.contributors_mean``; its ``accumulate`` then takes ``counts``)."""
    return bool(compressor.contributors_mean)


def owner_residual(compressor: Compressor) -> bool:
    """Whether ``two_phase`` keeps an owner-side error-feedback residual for ``compressor``
    (its ``server_error_default``, or ``owner_residual``: the sparse compressors, whose
    owner re-selection drops most of what it received)."""
    return bool(compressor.server_error_default or getattr(compressor, "owner_residual", False))


def select_collective(compressor: Compressor | type[Compressor], collective: str = "auto") -> str:
    """The collective for ``compressor``: by its algebra for ``"auto"``, else validated.
    The algebra flags are class attributes, so a compressor class answers too (nothing is
    built); only an instance can refuse a collective its options rule out
    (``contributors_mean``)."""
    if (collective not in ("auto", "allgather") and contributors_mean(compressor)
            and not (collective == "two_phase" and owner_chunk(compressor))):
        raise ValueError(f"collective={collective!r} cannot average compressor {compressor.name!r} over "
                         f"the ranks that sent each coordinate (mean=contributors): only 'allgather' and "
                         f"the chunk-aligned 'two_phase' see who sent what; use collective=auto or mean=all")
    if collective == "auto":
        if compressor.summable:
            return "allreduce"
        return "allgather" if compressor.sparse else "two_phase"
    if collective not in COLLECTIVES:
        raise ValueError(f"collective={collective!r}: valid values are auto, "
                         f"{', '.join(COLLECTIVES)}")
    if collective == "allreduce" and not compressor.summable:
        raise ValueError(f"collective='allreduce' cannot aggregate compressor "
                         f"{compressor.name!r}: its payloads do not add up in the compressed "
                         f"domain; use 'allgather' or 'two_phase' (auto picks "
                         f"{select_collective(compressor)!r})")
    return collective


def pack(payload: Payload) -> torch.Tensor:
    """The payload's wire tensors as one flat uint8 buffer of ``payload.nbytes`` bytes."""
    parts = [t.reshape(-1).contiguous().view(torch.uint8) for t in payload.tensors.values()]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def unpack(buf: torch.Tensor, template: Payload) -> Payload:
    """Inverse of :func:`pack`, with keys, sizes, dtypes, shape and meta of ``template``
    (another rank's payload of the same call has the same structure)."""
    out, off = {}, 0
    for key, t in template.tensors.items():
        nb = t.numel() * t.element_size()
        piece = buf[off:off + nb]
        if (piece.storage_offset() % t.element_size()) != 0:
            piece = piece.clone()                    # view(dtype) needs aligned storage
        out[key] = piece.view(t.dtype).view(t.shape)
        off += nb
    return Payload(out, template.shape, template.dtype, dict(template.meta))


def sparse_mean(compressor: Compressor, payloads, numel: int, p: int, device) -> torch.Tensor:
    """The fp32 mean of ``payloads`` (one per rank, in rank order) as the sparse all-gather
    computes it on every rank: scatter-added into one buffer in rank order, so the sum of
    each coordinate is formed in the same order, from the same bytes, on every rank
    (bitwise equal results); then divided by p, or, if the compressor asks for
    ``contributors_mean``, by the number of ranks whose payload carries the coordinate
    (SparseLoCo, arXiv 2508.15706; templar's ``scatter_reduce(..., "mean",
    include_self=False)``, which sums in an unspecified order on GPUs). A coordinate
    nobody sent is 0."""
    acc = torch.zeros(numel, dtype=torch.float32, device=device)
    if not contributors_mean(compressor):
        for pl in payloads:
            compressor.accumulate(pl, acc)
        return acc.div_(p)
    counts = torch.zeros(numel, dtype=torch.float32, device=device)
    for pl in payloads:
        compressor.accumulate(pl, acc, counts=counts)
    return acc.div_(counts.clamp_(min=1))


def new_server_error(numel: int, compressor: Compressor, group=None, device=None) -> torch.Tensor | None:
    """A zero server-side error buffer for a ``two_phase`` aggregation of ``numel``
    elements (fp32, ``chunk_numel`` long), or None when the compressor does not want one
    (``compressor.server_error_default``). The caller keeps it (the aggregator: keyed by
    parameter name) and passes it on every call."""
    if not compressor.server_error_default:
        return None
    p, _ = _world(group)
    return torch.zeros(chunk_numel(numel, p), dtype=torch.float32, device=device)


class Sequencer:
    """Launches second-phase collectives in ticket (= call) order, whatever order the
    first-phase completion callbacks run in. Owned by whoever issues the calls on one second
    group (``CompressedAggregator``); a fresh one per group object, never shared by id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_ticket = 0
        self.issued = 0
        self.pending: dict[int, object] = {}

    def ticket(self) -> int:
        with self.lock:
            t, self.next_ticket = self.next_ticket, self.next_ticket + 1
            return t

    def submit(self, ticket: int, launch) -> None:
        with self.lock:
            self.pending[ticket] = launch
            while self.issued in self.pending:
                fn = self.pending.pop(self.issued)
                self.issued += 1
                fn()


_DEFAULT_SEQUENCERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> its default
_NO_GROUP = Sequencer()  # the default group (``group2`` None)
_SEQ_LOCK = threading.Lock()


def _default_sequencer(group2) -> Sequencer:
    """For direct calls of :func:`launch` / :func:`aggregate_async` that bring no sequencer:
    one per group *object*, held weakly (a new group never inherits the tickets of a
    destroyed one, as it could when keyed by ``id``)."""
    if group2 is None:
        return _NO_GROUP
    with _SEQ_LOCK:
        return _DEFAULT_SEQUENCERS.setdefault(group2, Sequencer())


# ----------------------------------------------------------------------------- segments
def _chunk_step(step: int | None, p: int, j: int) -> int | None:
    """The step of chunk j (j = p: the owner's re-compression) in ``two_phase``."""
    return None if step is None else step * (p + 1) + j


def segment_step(iteration: int, name: str) -> int:
    """The compressor's random step for one parameter at one iteration: the same on every
    rank and independent of bucket layout (rand-k indices, stochastic rounding, sampling)."""
    return iteration * (1 << 20) + (zlib.crc32(name.encode()) & 0xFFFFF)


class TwoPhaseResult:
    """Holds the owner's updated server-side errors until the step is accepted."""

    def __init__(self, n: int):
        self.server_errors: list[torch.Tensor | None] = [None] * n


def launch(flats: list[torch.Tensor], compressor: Compressor, meter: WireMeter, *,
           steps: list[int | None], collective: str = "auto", group=None, group2=None,
           server_errors: list[torch.Tensor | None] | None = None, sequencer: Sequencer | None = None):
    """Start aggregating ``flats`` (1-D tensors) over the ranks of ``group``. Returns
    ``(sent, future, extra, nbytes)``: ``sent[i]`` is C(flats[i]) as this rank sent it
    (decompressed), ``future`` resolves to the list of means (dtype of each flat), ``extra``
    a :class:`TwoPhaseResult` (two_phase) or None, ``nbytes`` the size of this rank's
    compressed payloads. ``group2``: the group of two_phase's second collective (default
    ``group``; give one of its own when other collectives may be in flight on ``group``);
    ``server_errors[i]``: the owner's error buffer of segment i (:func:`new_server_error`),
    read, never written: its new value is in ``extra``."""
    kind = select_collective(compressor, collective)
    if kind == "allreduce":
        return _allreduce(flats, compressor, meter, steps, group)
    if kind == "allgather":
        return _allgather(flats, compressor, meter, steps, group)
    if owner_chunk(compressor):
        return _two_phase_runs(flats, compressor, meter, steps, group, group2, server_errors, sequencer)
    return _two_phase(flats, compressor, meter, steps, group, group2, server_errors, sequencer)


def _allreduce(flats, compressor, meter, steps, group):
    p, _ = _world(group)
    payloads = [compressor.compress(f, step=s) for f, s in zip(flats, steps)]
    sent = [compressor.decompress(pl) for pl in payloads]
    parts = [t.reshape(-1) for pl in payloads for t in pl.tensors.values()]
    if len({t.dtype for t in parts}) != 1:
        raise ValueError(f"compressor {compressor.name!r}: summable payloads must share one dtype")
    buf = torch.cat(parts).div_(p)  # divide before summing so fp16 cannot overflow
    work = all_reduce(meter, buf, group=group, async_op=True)

    def means(fut) -> list[torch.Tensor]:
        fut.value()  # a failed collective (a peer died) raises its own error, not one of decoding garbage
        out, off = [], 0
        for pl in payloads:
            tensors = {}
            for key, t in pl.tensors.items():
                tensors[key] = buf[off:off + t.numel()].view(t.shape)
                off += t.numel()
            out.append(compressor.decompress(Payload(tensors, pl.shape, pl.dtype, pl.meta)))
        return out

    return sent, then(work.get_future(), means), None, sum(pl.nbytes for pl in payloads)


def _allgather(flats, compressor, meter, steps, group):
    p, _ = _world(group)
    payloads = [compressor.compress(f, step=s) for f, s in zip(flats, steps)]
    sent = [compressor.decompress(pl) for pl in payloads]
    packed = [pack(pl) for pl in payloads]
    sizes = [b.numel() for b in packed]
    send = torch.cat(packed)
    out = torch.empty(p * send.numel(), dtype=torch.uint8, device=send.device)
    work = all_gather_into(meter, out, send, group=group, async_op=True)

    def means(fut) -> list[torch.Tensor]:
        fut.value()  # as in _allreduce: out holds garbage when a peer died mid all-gather
        rows = out.chunk(p)
        result, off = [], 0
        for f, pl, size in zip(flats, payloads, sizes):
            mine = [unpack(row[off:off + size], pl) for row in rows]  # segment i of every rank, in rank order
            result.append(sparse_mean(compressor, mine, f.numel(), p, f.device).to(f.dtype))
            off += size
        return result

    return sent, then(work.get_future(), means), None, send.numel()


def _two_phase(flats, compressor, meter, steps, group, group2, server_errors, sequencer=None):
    p, rank = _world(group)
    n_seg = len(flats)
    chunks = [chunk_numel(f.numel(), p) for f in flats]
    server_errors = fit_residuals(server_errors or [None] * n_seg, chunks)
    keep = owner_residual(compressor)
    payloads, sent = [], []  # payloads[i][j]: segment i, chunk j
    for f, c, s in zip(flats, chunks, steps):
        padded = torch.zeros(p * c, dtype=f.dtype, device=f.device)
        padded[:f.numel()] = f
        pls = [compressor.compress(padded[j * c:(j + 1) * c], step=_chunk_step(s, p, j)) for j in range(p)]
        payloads.append(pls)
        sent.append(torch.cat([compressor.decompress(pl) for pl in pls])[:f.numel()])
    send = torch.cat([pack(payloads[i][j]) for j in range(p) for i in range(n_seg)])
    sizes = [pack(payloads[i][rank]).numel() for i in range(n_seg)]
    recv = torch.empty_like(send)
    work = all_to_all_single(meter, recv, send, group=group, async_op=True)
    extra = TwoPhaseResult(n_seg)
    result: torch.futures.Future = torch.futures.Future()
    second = group2 if group2 is not None else group  # the group of the all-gather
    seq = sequencer if sequencer is not None else _default_sequencer(second if p > 1 else None)
    ticket = seq.ticket()
    ctx: dict = {}
    # the second all-gather is launched from a callback, at a moment no step controls (under
    # co2 it may finish steps later): charge it now, at launch, so every run charges the same
    # bytes to the same step. Its payload is the owner's re-compressed chunk, the same size
    # as the chunk this rank sent (fixed-size compressors: two_phase needs equal sizes anyway)
    second_bytes = sum(sizes)
    meter.charge(collective_bytes("all_gather", second_bytes, 1, group_size(second)), "data", "all_gather",
                 group_size(second))

    def owner_average() -> torch.Tensor:
        """Average my chunk of every segment in fp32, add my server error, re-compress."""
        pieces, firsts = [], []
        for i in range(n_seg):
            acc = torch.zeros(chunks[i], dtype=torch.float32, device=send.device)
            for row in recv.chunk(p):
                off = sum(sizes[:i])
                compressor.accumulate(unpack(row[off:off + sizes[i]], payloads[i][rank]), acc)
            acc.div_(p)
            if server_errors[i] is not None:
                acc.add_(server_errors[i])
            pl = compressor.compress(acc, step=_chunk_step(steps[i], p, p))
            if server_errors[i] is not None or keep:
                extra.server_errors[i] = acc - compressor.decompress(pl).float()
            firsts.append(pl)
            pieces.append(pack(pl))
        ctx["templates"], ctx["sizes2"] = firsts, [b.numel() for b in pieces]
        if sum(ctx["sizes2"]) != second_bytes:
            raise ValueError(f"two_phase: compressor {compressor.name!r} re-compressed a chunk to "
                             f"{sum(ctx['sizes2'])} bytes, not {second_bytes}: it needs a fixed payload size")
        return torch.cat(pieces)

    def finish(fut) -> None:
        try:
            fut.value()  # the second all-gather's own error, if it failed
            outs = [torch.empty(p * c, dtype=torch.float32, device=send.device) for c in chunks]
            for j, row in enumerate(ctx["out"].chunk(p)):
                off = 0
                for i in range(n_seg):
                    size = ctx["sizes2"][i]
                    outs[i][j * chunks[i]:(j + 1) * chunks[i]] = compressor.decompress(
                        unpack(row[off:off + size], ctx["templates"][i])).float()
                    off += size
            result.set_result([o[:f.numel()].to(f.dtype) for o, f in zip(outs, flats)])
        except Exception as e:  # noqa: BLE001 - surfaced through the future
            result.set_exception(e)

    def exchanged(fut) -> None:
        try:
            fut.value()  # the first phase's own error, if it failed
            buf = owner_average()
            ctx["out"] = torch.empty(p * buf.numel(), dtype=torch.uint8, device=buf.device)
        except Exception as e:  # noqa: BLE001
            seq.submit(ticket, lambda: None)
            result.set_exception(e)
            return

        def second_phase() -> None:
            try:
                w2 = all_gather_into(UNCOUNTED, ctx["out"], buf, group=second, async_op=True)  # charged at launch
                on_done(w2.get_future(), finish)
            except Exception as e:  # noqa: BLE001
                result.set_exception(e)
        seq.submit(ticket, second_phase)

    on_done(work.get_future(), exchanged)
    return sent, result, extra, send.numel()


# ----------------------------------------------------------------------------- two_phase by runs
def _all_to_all_v(meter, out: torch.Tensor, send: torch.Tensor, in_splits: list[int], out_splits: list[int],
                  group, rank: int, charge: bool = True):
    """All-to-all of uint8 pieces of uneven sizes (gloo/NCCL alltoallv: every rank sends
    ``in_splits[j]`` bytes to rank j). Charged: what leaves this rank, every piece but its own
    (``collective_bytes('all_to_all', ...)`` for equal splits)."""
    p = len(in_splits)
    if charge:
        meter.charge(sum(in_splits) - in_splits[rank], "data", "all_to_all", p)
    if not dist.is_initialized():
        out.copy_(send)
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result([out])
        return fut
    work = dist.all_to_all_single(out, send, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=True)
    hold(work)  # no gloo thread may drop the last reference (thinwire.comm.futures)
    return work.get_future()


def _two_phase_runs(flats, compressor, meter, steps, group, group2, server_errors, sequencer=None):
    """two_phase for a compressor that selects per run of ``owner_chunk`` elements (chunk_topk):
    ownership by whole runs (:func:`owner_ranges`), so every sender's selection in an owner's
    range is its selection of those runs, the owner's re-selection keeps k per run, and the
    contributor counts come with the indices. Phase 1: every rank compresses each owner's range
    of every segment on its own (one code book per range) and sends it in one alltoallv. The
    owner adds what it received in rank order in fp32 (counting contributors if the compressor
    averages over them), divides, adds its residual for the range, re-compresses, and keeps
    what it did not send as the new residual. Phase 2: one alltoallv sends every owner's
    selection to every rank; all decode the same bytes, so the result is bitwise equal on all
    ranks. Payload sizes follow from the shapes alone; empty ranges send nothing."""
    p, rank = _world(group)
    C, n_seg = owner_chunk(compressor), len(flats)
    contrib = contributors_mean(compressor)
    ranges = [owner_ranges(f.numel(), C, p, owner_offset(s, i) % p) for i, (f, s) in enumerate(zip(flats, steps))]
    mine = [r[rank] for r in ranges]
    residuals = fit_residuals(server_errors or [None] * n_seg, [b - a for a, b in mine])
    keep = owner_residual(compressor)
    payloads: list = [[None] * p for _ in range(n_seg)]   # payloads[i][j]: segment i, owner j's range
    sent, packed = [], [[None] * p for _ in range(n_seg)]
    for i, (f, s) in enumerate(zip(flats, steps)):
        x = f.reshape(-1)
        local = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
        for j, (a, b) in enumerate(ranges[i]):
            if b > a:
                pl = compressor.compress(x[a:b], step=_chunk_step(s, p, j))
                payloads[i][j], packed[i][j] = pl, pack(pl)
                local[a:b] = compressor.decompress(pl).float()
        sent.append(local.to(f.dtype))
    size = [[0 if packed[i][j] is None else packed[i][j].numel() for j in range(p)] for i in range(n_seg)]
    to = [sum(size[i][j] for i in range(n_seg)) for j in range(p)]          # bytes to owner j
    device = flats[0].device if flats else torch.device("cpu")
    parts = [packed[i][j] for j in range(p) for i in range(n_seg) if packed[i][j] is not None]
    send = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(p * to[rank], dtype=torch.uint8, device=device)
    fut1 = _all_to_all_v(meter, recv, send, to, [to[rank]] * p, group, rank)
    extra = TwoPhaseResult(n_seg)
    result: torch.futures.Future = torch.futures.Future()
    second = group2 if group2 is not None else group
    seq = sequencer if sequencer is not None else _default_sequencer(second if p > 1 else None)
    ticket = seq.ticket()
    # phase 2 is launched from a callback: charge it now (see _two_phase). The owner's
    # re-compressed range has the structure of the range every sender sent it
    meter.charge((p - 1) * to[rank], "data", "all_to_all", p)
    gathered = torch.empty(sum(to), dtype=torch.uint8, device=device)

    def owner_select() -> torch.Tensor:
        pieces = []
        for i in range(n_seg):
            a, b = mine[i]
            if b == a:
                if keep:
                    extra.server_errors[i] = torch.zeros(0, dtype=torch.float32, device=device)
                continue
            acc = torch.zeros(b - a, dtype=torch.float32, device=device)
            counts = torch.zeros(b - a, dtype=torch.float32, device=device) if contrib else None
            off = sum(size[k][rank] for k in range(i))
            for row in recv.chunk(p):            # senders in rank order: the same sums on every rank
                pl = unpack(row[off:off + size[i][rank]], payloads[i][rank])
                if contrib:
                    compressor.accumulate(pl, acc, counts=counts)
                else:
                    compressor.accumulate(pl, acc)
            acc.div_(counts.clamp_(min=1) if contrib else p)
            if residuals[i] is not None:
                acc.add_(residuals[i])
            pl = compressor.compress(acc, step=_chunk_step(steps[i], p, p))
            if keep:
                extra.server_errors[i] = acc - compressor.decompress(pl).float()
            pieces.append(pack(pl))
        buf = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device)
        if buf.numel() != to[rank]:
            raise ValueError(f"two_phase: compressor {compressor.name!r} re-compressed its ranges to "
                             f"{buf.numel()} bytes, not {to[rank]}: it needs payload sizes fixed by the shape")
        return buf

    def finish(fut) -> None:
        try:
            fut.value()  # phase 2's own error, if it failed
            outs = [torch.zeros(f.numel(), dtype=torch.float32, device=device) for f in flats]
            off = 0
            for j in range(p):
                for i in range(n_seg):
                    a, b = ranges[i][j]
                    if b > a:
                        pl = unpack(gathered[off:off + size[i][j]], payloads[i][j])
                        outs[i][a:b] = compressor.decompress(pl).float()
                        off += size[i][j]
            result.set_result([o.to(f.dtype) for o, f in zip(outs, flats)])
        except Exception as e:  # noqa: BLE001 - surfaced through the future
            result.set_exception(e)

    def exchanged(_f) -> None:
        try:
            _f.value()
            buf = owner_select()
        except Exception as e:  # noqa: BLE001
            seq.submit(ticket, lambda: None)
            result.set_exception(e)
            return

        def second_phase() -> None:
            try:
                on_done(_all_to_all_v(meter, gathered, buf.repeat(p), [buf.numel()] * p, to, second, rank,
                                      charge=False), finish)   # charged at launch
            except Exception as e:  # noqa: BLE001
                result.set_exception(e)
        seq.submit(ticket, second_phase)

    on_done(fut1, exchanged)
    return sent, result, extra, send.numel()


# ----------------------------------------------------------------------------- one tensor
def aggregate_async(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
                    group2=None, collective: str = "auto",
                    server_error: torch.Tensor | None = None,
                    step: int | None = None) -> torch.futures.Future:
    """The mean over the ranks of ``group`` of every rank's ``flat`` (any shape), through
    ``compressor``: :func:`launch` with one segment. A Future resolving to a tensor of
    ``flat``'s shape and dtype (usable as a DDP comm hook's return value, chainable with
    ``.then``). ``server_error`` (two_phase only, :func:`new_server_error`) is updated in
    place before the Future resolves. ``two_phase`` needs ``group2`` when the group has more
    than one rank: a process group over the same ranks, used only for the second
    collectives (launched from callbacks). All ranks must call this in the same order."""
    kind = select_collective(compressor, collective)
    if kind == "two_phase" and group2 is None and _world(group)[0] > 1:
        raise ValueError("aggregate_async with two_phase needs group2 (a separate process "
                         "group for the second collective)")
    return _aggregate_one(flat, compressor, meter, group, group2, kind, server_error, step)


def aggregate(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
              collective: str = "auto", server_error: torch.Tensor | None = None,
              step: int | None = None) -> torch.Tensor:
    """:func:`aggregate_async`, waited for; two_phase's second collective runs on ``group``
    (this call is the only one in flight)."""
    return _aggregate_one(flat, compressor, meter, group, None, collective, server_error, step).wait()


def _aggregate_one(flat, compressor, meter, group, group2, collective, server_error, step):
    p, rank = _world(group)
    if select_collective(compressor, collective) != "two_phase":
        server_error = None
    elif server_error is not None:
        if owner_chunk(compressor):   # the run-aligned two_phase: this rank's owner range
            a, b = owner_ranges(flat.numel(), owner_chunk(compressor), p, owner_offset(step, 0) % p)[rank]
            want, what = b - a, "its owner range (owner_ranges)"
        else:
            want, what = chunk_numel(flat.numel(), p), "chunk_numel(numel, p)"
        if server_error.numel() != want:
            raise ValueError(f"server_error has {server_error.numel()} elements; two_phase needs {what} = {want}")
    _, fut, extra, _ = launch([flat.reshape(-1)], compressor, meter, steps=[step], collective=collective,
                              group=group, group2=group2, server_errors=[server_error])

    def finish(f: torch.futures.Future) -> torch.Tensor:
        mean = f.value()[0]
        if server_error is not None and extra is not None and extra.server_errors[0] is not None:
            server_error.copy_(extra.server_errors[0])
        return mean.reshape(flat.shape).to(flat.dtype)

    return then(fut, finish)
