"""Collectives: every rank's tensor -> the mean over ranks, through a compressor.

Three ways to aggregate (ALGORITHMS.md, "Collectives"), chosen by the compressor's algebra:

* ``allreduce`` (``compressor.summable``: none/fp16/bf16/randk): divide the payload by p
  (before summing, as torch's ``fp16_compress_hook`` does, so fp16 cannot overflow),
  ring all-reduce (sum) each payload tensor, decompress.  Bytes/rank 2 (p-1)/p * nbytes.
* ``allgather`` (``compressor.sparse``: topk/ternary/chunk_topk): all-gather every rank's
  payload (uniform size, packed into one uint8 buffer), scatter-add in fp32 in rank order,
  divide by p - or, for a compressor with ``contributors_mean`` (chunk_topk's default,
  SparseLoCo), divide each coordinate by the number of ranks that sent it
  (:func:`sparse_mean`). Bytes/rank (p-1) * nbytes - they grow with p, as the sparse
  all-gather must. Exact for every compressor, so also usable with quantisers (EF21 /
  EControl need every rank to receive exactly mean_i C(x_i)).
* ``two_phase`` (quantisers: int8/dynamic8/sign1; 1-bit Adam, Tang et al. 2021, Sec. 4;
  ZeRO++ qgZ): pad and split into p chunks, compress each, one ``all_to_all_single`` of
  the packed chunks (rank r receives every rank's chunk r), decompress and average in
  fp32, optionally add/refresh the owner's server-side error buffer, re-compress,
  ``all_gather`` the packed chunks, decompress.  Bytes/rank
  (p-1)/p * p B + (p-1) B = 2 (p-1) B with B = compressed bytes of one chunk ~ n/p *
  bits/8: O(n), independent of p.  Works for any compressor.

Every collective goes through ``thinwire.comm.accounting`` so its bytes are charged.
``collective="auto"`` picks by the algebra; an override is allowed where it is correct
(allgather and two_phase work for any compressor); ``allreduce`` of a non-summable
payload raises ``ValueError``.

Async (DDP comm hooks): :func:`aggregate_async` returns a ``torch.futures.Future``
resolving to the mean.  Phase 1 is launched at once (async_op); for ``two_phase`` the
second collective is launched from phase 1's completion callback on ``group2`` - a
process group of its own, so collectives launched from callbacks never interleave with
the ones the main thread issues on ``group`` - and in the order of the
``aggregate_async`` calls (a per-group2 sequencer), so every rank issues them in the
same order even when gloo completes phase 1 of several buckets out of order.  No
callback ever calls ``wait()``.

``step``: forwarded to ``compressor.compress`` (rand-k indices, stochastic rounding,
sampled top-k threshold); ``None`` uses the compressor's own call counter.  In
``two_phase`` chunk j is compressed with ``step * (p + 1) + j`` and the owner's
re-compression with ``step * (p + 1) + p``.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from .accounting import WireMeter, all_gather_into, all_reduce, all_to_all_single
from .compressors import Compressor, Payload

COLLECTIVES = ("allreduce", "allgather", "two_phase")


# ----------------------------------------------------------------------------- helpers
def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def contributors_mean(compressor: Compressor) -> bool:
    """Whether ``compressor`` asks the sparse all-gather for the mean over contributing ranks
    (an instance attribute, like the algebra flags; its ``accumulate`` then takes ``counts``)."""
    return bool(getattr(compressor, "contributors_mean", False))


def select_collective(compressor: Compressor, collective: str = "auto") -> str:
    """The collective for ``compressor``: by its algebra for ``"auto"``, else validated."""
    if collective != "auto" and collective != "allgather" and contributors_mean(compressor):
        raise ValueError(f"collective={collective!r} cannot average compressor {compressor.name!r} over "
                         f"the ranks that sent each coordinate (mean=contributors): only 'allgather' sees "
                         f"who sent what; use collective=auto or mean=all")
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


def chunk_numel(numel: int, world_size: int) -> int:
    """Elements per rank's chunk in ``two_phase``: ceil(numel / p), rounded up to a multiple
    of 8 so packed sign bits of different chunks never share a byte."""
    c = -(-numel // max(1, world_size))
    return max(8, -(-c // 8) * 8)


def new_server_error(numel: int, compressor: Compressor, group=None,
                     device=None, force: bool | None = None) -> torch.Tensor | None:
    """A zero server-side error buffer for a ``two_phase`` aggregation of ``numel``
    elements (fp32, ``chunk_numel`` long), or None when the compressor does not want one
    (``compressor.server_error_default``; ``force`` overrides).  The caller keeps it
    (e.g. in the hook state, keyed by parameter names) and passes it on every call."""
    want = compressor.server_error_default if force is None else force
    if not want:
        return None
    p, _ = _world(group)
    return torch.zeros(chunk_numel(numel, p), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- allreduce
def _allreduce_launch(flat, compressor, meter, group, step, async_op):
    p, _ = _world(group)
    payload = compressor.compress(flat, step=step)
    if any(not t.is_floating_point() for t in payload.tensors.values()):
        raise ValueError(f"compressor {compressor.name!r} claims summable but has "
                         f"non-float payload tensors")
    # divide before summing (fp16 overflow); out of place: "none" may alias ``flat``
    payload.tensors = {k: t / p for k, t in payload.tensors.items()}
    works = [all_reduce(meter, t, group=group, async_op=async_op)
             for t in payload.tensors.values()]
    return payload, works


def _allreduce_finish(flat, compressor, payload):
    return compressor.decompress(payload).reshape(flat.shape).to(flat.dtype)


def allreduce(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
              *, step: int | None = None) -> torch.Tensor:
    """Mean over ranks of a summable compressor's payloads, by ring all-reduce."""
    select_collective(compressor, "allreduce")
    payload, _ = _allreduce_launch(flat, compressor, meter, group, step, False)
    return _allreduce_finish(flat, compressor, payload)


# ----------------------------------------------------------------------------- allgather
def _allgather_launch(flat, compressor, meter, group, step, async_op):
    p, _ = _world(group)
    payload = compressor.compress(flat, step=step)
    buf = pack(payload)
    out = torch.empty(p * buf.numel(), dtype=torch.uint8, device=buf.device)
    work = all_gather_into(meter, out, buf, group=group, async_op=async_op)
    return payload, out, work


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


def _allgather_finish(flat, compressor, payload, out):
    p = out.numel() // max(1, payload.nbytes) if payload.nbytes else 1
    rows = [unpack(buf, payload) for buf in out.chunk(p)] if payload.nbytes else []
    acc = sparse_mean(compressor, rows, flat.numel(), p, flat.device)
    return acc.reshape(flat.shape).to(flat.dtype)


def allgather(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
              *, step: int | None = None) -> torch.Tensor:
    """Mean over ranks by all-gather of every rank's (packed) payload and scatter-add."""
    payload, out, _ = _allgather_launch(flat, compressor, meter, group, step, False)
    return _allgather_finish(flat, compressor, payload, out)


# ----------------------------------------------------------------------------- two-phase
def _chunk_step(step, p, j):
    return None if step is None else step * (p + 1) + j


def _tp_launch(flat, compressor, meter, group, step, async_op):
    p, rank = _world(group)
    n, c = flat.numel(), chunk_numel(flat.numel(), p)
    padded = torch.zeros(p * c, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat.reshape(-1)
    payloads = [compressor.compress(padded[j * c:(j + 1) * c], step=_chunk_step(step, p, j))
                for j in range(p)]
    send = torch.cat([pack(pl) for pl in payloads])
    recv = torch.empty_like(send)
    work = all_to_all_single(meter, recv, send, group=group, async_op=async_op)
    return {"p": p, "rank": rank, "c": c, "template": payloads[rank], "recv": recv}, work


def _tp_middle(ctx, compressor, server_error, step):
    """Owner: average the p received versions of its chunk in fp32, server-side error
    feedback (1-bit Adam, Alg. 1: q = avg + e; e = q - C(q)), re-compress, pack."""
    p, c = ctx["p"], ctx["c"]
    acc = torch.zeros(c, dtype=torch.float32, device=ctx["recv"].device)
    for buf in ctx["recv"].chunk(p):
        compressor.accumulate(unpack(buf, ctx["template"]), acc)
    acc.div_(p)
    if server_error is not None:
        if server_error.numel() != c:
            raise ValueError(f"server_error has {server_error.numel()} elements; two_phase "
                             f"needs chunk_numel(numel, p) = {c}")
        acc.add_(server_error)
    payload = compressor.compress(acc, step=_chunk_step(step, p, p))
    if server_error is not None:
        server_error.copy_(acc - compressor.decompress(payload).float())
    buf = pack(payload)
    ctx["template2"] = payload
    ctx["out"] = torch.empty(p * buf.numel(), dtype=torch.uint8, device=buf.device)
    return buf


def _tp_finish(flat, compressor, ctx):
    p, c, n = ctx["p"], ctx["c"], flat.numel()
    result = torch.empty(p * c, dtype=torch.float32, device=flat.device)
    for j, buf in enumerate(ctx["out"].chunk(p)):
        result[j * c:(j + 1) * c] = compressor.decompress(unpack(buf, ctx["template2"])).float()
    return result[:n].reshape(flat.shape).to(flat.dtype)


def two_phase(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
              *, server_error: torch.Tensor | None = None, group2=None,
              step: int | None = None) -> torch.Tensor:
    """Mean over ranks by all-to-all of compressed chunks, fp32 sum on the owner,
    re-compression and all-gather (see module docstring).  ``server_error``: the owner's
    error buffer for its chunk (``new_server_error``), updated in place; ``group2``:
    group of the all-gather (default ``group``)."""
    ctx, _ = _tp_launch(flat, compressor, meter, group, step, False)
    buf = _tp_middle(ctx, compressor, server_error, step)
    all_gather_into(meter, ctx["out"], buf, group=group2 if group2 is not None else group)
    return _tp_finish(flat, compressor, ctx)


# ----------------------------------------------------------------------------- front door
def aggregate(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
              collective: str = "auto", server_error: torch.Tensor | None = None,
              step: int | None = None) -> torch.Tensor:
    """The mean over the ranks of ``group`` of every rank's ``flat``, through
    ``compressor``, with bytes charged to ``meter``.  Same shape and dtype as ``flat``.
    ``server_error`` is used only by ``two_phase`` (ignored elsewhere)."""
    kind = select_collective(compressor, collective)
    if kind == "allreduce":
        return allreduce(flat, compressor, meter, group, step=step)
    if kind == "allgather":
        return allgather(flat, compressor, meter, group, step=step)
    return two_phase(flat, compressor, meter, group, server_error=server_error, step=step)


class _Sequencer:
    """Launches second-phase collectives in ticket (= call) order, whatever order the
    first-phase completion callbacks run in."""

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


_SEQUENCERS: dict[int, _Sequencer] = {}
_SEQ_LOCK = threading.Lock()


def _sequencer(group2) -> _Sequencer:
    key = id(group2) if group2 is not None else 0
    with _SEQ_LOCK:
        return _SEQUENCERS.setdefault(key, _Sequencer())


def _future_of(works) -> torch.futures.Future:
    futs = [w.get_future() for w in works]
    return futs[0] if len(futs) == 1 else torch.futures.collect_all(futs)


def aggregate_async(flat: torch.Tensor, compressor: Compressor, meter: WireMeter, group=None,
                    group2=None, collective: str = "auto",
                    server_error: torch.Tensor | None = None,
                    step: int | None = None) -> torch.futures.Future:
    """Like :func:`aggregate`, but returns a ``torch.futures.Future`` resolving to the
    mean (usable as a DDP comm hook's return value, chainable with ``.then``).

    ``two_phase`` needs ``group2`` when the world has more than one rank: a process
    group over the same ranks as ``group``, used only for the second collectives
    (launched from callbacks).  All ranks must call this in the same order."""
    kind = select_collective(compressor, collective)
    if kind == "allreduce":
        payload, works = _allreduce_launch(flat, compressor, meter, group, step, True)
        return _future_of(works).then(lambda _f: _allreduce_finish(flat, compressor, payload))
    if kind == "allgather":
        payload, out, work = _allgather_launch(flat, compressor, meter, group, step, True)
        return work.get_future().then(
            lambda _f: _allgather_finish(flat, compressor, payload, out))

    p, _ = _world(group)
    if p > 1 and group2 is None:
        raise ValueError("aggregate_async with two_phase needs group2 (a separate process "
                         "group for the second collective)")
    seq = _sequencer(group2)
    ticket = seq.ticket()
    ctx, work = _tp_launch(flat, compressor, meter, group, step, True)
    result: torch.futures.Future = torch.futures.Future()

    def on_gathered(f):
        try:
            f.value()
            result.set_result(_tp_finish(flat, compressor, ctx))
        except Exception as e:  # noqa: BLE001 - surfaced through the future
            result.set_exception(e)

    def on_exchanged(f):
        try:
            f.value()
            buf = _tp_middle(ctx, compressor, server_error, step)
        except Exception as e:  # noqa: BLE001
            seq.submit(ticket, lambda: None)
            result.set_exception(e)
            return

        def launch():
            try:
                w2 = all_gather_into(meter, ctx["out"], buf, group=group2, async_op=True)
                w2.get_future().add_done_callback(on_gathered)
            except Exception as e:  # noqa: BLE001
                result.set_exception(e)
        seq.submit(ticket, launch)

    work.get_future().add_done_callback(on_exchanged)
    return result
