"""Layer-wise compressed aggregation: many tensors, each compressed on its own, in ONE
collective per call.

The segments are the parameters of one DDP bucket (or of a whole model, for the outer
all-reduce of local updates). Compressing per parameter rather than per bucket is what
makes the result independent of how DDP groups parameters into buckets: DDP runs its
first iteration on initial buckets and rebuilds them afterwards, so a restarted job sees
different buckets on its first step than the uninterrupted job did. Per-parameter
compression (with randomness keyed by parameter name, see ``segment_step``) gives the
same bits either way, which keeps resume bitwise exact; it is also the "layer-wise"
Top-K / per-tensor scaling that DGC and 8-bit schemes use.

The three collectives of ``thinwire.comm.collectives`` (see its docstring for the bytes
per rank), lifted to segments:

- ``allreduce`` (summable payloads): the payload tensors of every segment are
  concatenated, divided by p, summed by one ring all-reduce, split and decompressed;
- ``allgather`` (sparse, or any payload): the packed payloads are concatenated and
  all-gathered; every rank scatter-adds every rank's segments in fp32, in rank order, and
  divides by p, or by each coordinate's number of contributors when the compressor asks
  for it (``contributors_mean``, chunk_topk; ``collectives.sparse_mean``);
- ``two_phase`` (quantised): every segment is split into p chunks; chunk j of every
  segment goes to rank j in one all-to-all; the owner averages in fp32, applies its
  server-side error (1-bit Adam), re-compresses, and one all-gather returns the chunks.

``launch`` returns what this rank sent (decompressed: the error-feedback rules need it)
and a Future of the means. The second phase of ``two_phase`` is launched from a
callback on ``group2`` through a sequencer, so every rank issues it in call order.
"""
from __future__ import annotations

import zlib

import torch

from .accounting import WireMeter, all_gather_into, all_reduce, all_to_all_single
from .collectives import _sequencer, _world, chunk_numel, pack, select_collective, sparse_mean, unpack
from .compressors import Compressor, Payload


def segment_step(iteration: int, name: str) -> int:
    """The compressor's random step for one parameter at one iteration: the same on every
    rank and independent of bucket layout (rand-k indices, stochastic rounding, sampling)."""
    return iteration * (1 << 20) + (zlib.crc32(name.encode()) & 0xFFFFF)


class TwoPhaseResult:
    """Holds the owner's updated server-side errors until the step is accepted."""

    def __init__(self, n: int):
        self.server_errors: list[torch.Tensor | None] = [None] * n


def launch(flats: list[torch.Tensor], compressor: Compressor, meter: WireMeter, *, steps: list[int],
           collective: str = "auto", group=None, group2=None,
           server_errors: list[torch.Tensor | None] | None = None):
    """Start aggregating ``flats`` (1-D fp32 tensors). Returns ``(sent, future, extra,
    nbytes)``: ``sent[i]`` is C(flats[i]) as this rank sent it (decompressed), ``future``
    resolves to the list of means, ``extra`` a :class:`TwoPhaseResult` (two_phase) or
    None, ``nbytes`` the size of this rank's compressed payloads."""
    kind = select_collective(compressor, collective)
    if kind == "allreduce":
        return _allreduce(flats, compressor, meter, steps, group)
    if kind == "allgather":
        return _allgather(flats, compressor, meter, steps, group)
    return _two_phase(flats, compressor, meter, steps, group, group2, server_errors)


def _allreduce(flats, compressor, meter, steps, group):
    p, _ = _world(group)
    payloads = [compressor.compress(f, step=s) for f, s in zip(flats, steps)]
    sent = [compressor.decompress(pl) for pl in payloads]
    parts = [t.reshape(-1) for pl in payloads for t in pl.tensors.values()]
    if len({t.dtype for t in parts}) != 1:
        raise ValueError(f"compressor {compressor.name!r}: summable payloads must share one dtype")
    buf = torch.cat(parts).div_(p)  # divide before summing so fp16 cannot overflow
    work = all_reduce(meter, buf, group=group, async_op=True)

    def means(_f) -> list[torch.Tensor]:
        out, off = [], 0
        for pl in payloads:
            tensors = {}
            for key, t in pl.tensors.items():
                tensors[key] = buf[off:off + t.numel()].view(t.shape)
                off += t.numel()
            out.append(compressor.decompress(Payload(tensors, pl.shape, pl.dtype, pl.meta)))
        return out

    return sent, work.get_future().then(means), None, sum(pl.nbytes for pl in payloads)


def _allgather(flats, compressor, meter, steps, group):
    p, _ = _world(group)
    payloads = [compressor.compress(f, step=s) for f, s in zip(flats, steps)]
    sent = [compressor.decompress(pl) for pl in payloads]
    packed = [pack(pl) for pl in payloads]
    sizes = [b.numel() for b in packed]
    send = torch.cat(packed)
    out = torch.empty(p * send.numel(), dtype=torch.uint8, device=send.device)
    work = all_gather_into(meter, out, send, group=group, async_op=True)

    def means(_f) -> list[torch.Tensor]:
        rows = out.chunk(p)
        result, off = [], 0
        for f, pl, size in zip(flats, payloads, sizes):
            mine = [unpack(row[off:off + size], pl) for row in rows]  # segment i of every rank, in rank order
            result.append(sparse_mean(compressor, mine, f.numel(), p, f.device).to(f.dtype))
            off += size
        return result

    return sent, work.get_future().then(means), None, send.numel()


def _two_phase(flats, compressor, meter, steps, group, group2, server_errors):
    p, rank = _world(group)
    n_seg = len(flats)
    server_errors = server_errors or [None] * n_seg
    chunks = [chunk_numel(f.numel(), p) for f in flats]
    payloads, sent = [], []  # payloads[i][j]: segment i, chunk j
    for f, c, s in zip(flats, chunks, steps):
        padded = torch.zeros(p * c, dtype=f.dtype, device=f.device)
        padded[:f.numel()] = f
        pls = [compressor.compress(padded[j * c:(j + 1) * c], step=s * (p + 1) + j) for j in range(p)]
        payloads.append(pls)
        sent.append(torch.cat([compressor.decompress(pl) for pl in pls])[:f.numel()])
    send = torch.cat([pack(payloads[i][j]) for j in range(p) for i in range(n_seg)])
    sizes = [pack(payloads[i][rank]).numel() for i in range(n_seg)]
    recv = torch.empty_like(send)
    work = all_to_all_single(meter, recv, send, group=group, async_op=True)
    extra = TwoPhaseResult(n_seg)
    result: torch.futures.Future = torch.futures.Future()
    seq = _sequencer(group2 if p > 1 else None)
    ticket = seq.ticket()
    ctx: dict = {}

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
            pl = compressor.compress(acc, step=steps[i] * (p + 1) + p)
            if server_errors[i] is not None:
                extra.server_errors[i] = acc - compressor.decompress(pl).float()
            firsts.append(pl)
            pieces.append(pack(pl))
        ctx["templates"], ctx["sizes2"] = firsts, [b.numel() for b in pieces]
        return torch.cat(pieces)

    def finish(_f) -> None:
        try:
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

    def exchanged(_f) -> None:
        try:
            buf = owner_average()
            ctx["out"] = torch.empty(p * buf.numel(), dtype=torch.uint8, device=buf.device)
        except Exception as e:  # noqa: BLE001
            seq.submit(ticket, lambda: None)
            result.set_exception(e)
            return

        def second_phase() -> None:
            try:
                w2 = all_gather_into(meter, ctx["out"], buf, group=group2 if p > 1 else group, async_op=True)
                w2.get_future().add_done_callback(finish)
            except Exception as e:  # noqa: BLE001
                result.set_exception(e)
        seq.submit(ticket, second_phase)

    work.get_future().add_done_callback(exchanged)
    return sent, result, extra, send.numel()
