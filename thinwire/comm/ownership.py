"""Who owns what in ``two_phase`` (``thinwire.comm.collectives``), from shapes alone: the chunk
each rank owns of a quantised segment (:func:`chunk_numel`), the run-aligned owner ranges of a
compressor that selects per run (:func:`owner_chunk`, :func:`owner_ranges`, :func:`owner_offset`),
the owner residuals that still fit a world size (:func:`fit_residuals`) and the bytes one rank
sends in one call (:func:`two_phase_bytes`: the accounting benchmarks and the network clock use it
without running a collective).
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from .compressors import Compressor


def owner_chunk(compressor: Compressor | type[Compressor]) -> int:
    """The granularity of ownership in ``two_phase`` for a compressor that selects per run
    (``chunk_topk``: its ``chunk``), else 0 (quantisers: :func:`chunk_numel`)."""
    return int(getattr(compressor, "owner_chunk", 0) or 0)


def chunk_numel(numel: int, world_size: int) -> int:
    """Elements per rank's chunk in ``two_phase``: ceil(numel / p), rounded up to a multiple
    of 8 so packed sign bits of different chunks never share a byte."""
    c = -(-numel // max(1, world_size))
    return max(8, -(-c // 8) * 8)


def fit_residuals(residuals: list, sizes: list[int]) -> list:
    """``residuals`` with every buffer whose length is not its owner range's (``sizes``) reset to
    None (zeros): the world size or the ownership changed since it was kept. One warning line
    per call names how many were reset and the norm lost."""
    out, lost, n = list(residuals), 0.0, 0
    for i, (e, m) in enumerate(zip(residuals, sizes)):
        if e is not None and e.numel() != m:
            lost += float(e.double().pow(2).sum())
            out[i], n = None, n + 1
    if n and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"thinwire: warning: two_phase: {n} owner residual(s) do not match this world size's owner "
              f"ranges (the world size changed?): reset, norm lost {lost ** 0.5:.6g}", file=sys.stderr, flush=True)
    return out


def owner_offset(step: int | None, index: int) -> int:
    """Which rank owns a segment's first block of runs: the low 20 bits of its step, which
    :func:`segment_step` makes a hash of the parameter's name (so ownership does not depend on
    which bucket or call the parameter travels in, and small parameters spread over the ranks);
    the segment's position in the call when no step is given (library use)."""
    return index if step is None else int(step) & 0xFFFFF


def owner_ranges(numel: int, chunk: int, p: int, offset: int = 0) -> list[tuple[int, int]]:
    """``[start, end)`` of every rank's elements of one segment in the run-aligned two_phase:
    the segment's ceil(numel / chunk) runs (the last one may be partial) in p contiguous
    blocks of q or q + 1 runs (q = runs // p; the first runs % p blocks get one more), block b
    owned by rank (offset + b) % p. A rank may own nothing (start == end)."""
    runs = -(-numel // chunk)
    q, rem = divmod(runs, p)
    out: list = [None] * p
    r = 0
    for b in range(p):
        nb = q + (b < rem)
        out[(offset + b) % p] = (min(r * chunk, numel), min((r + nb) * chunk, numel))
        r += nb
    return out


def two_phase_bytes(numels: list[int], compressor: Compressor, p: int, rank: int | None = None,
                    offsets: list[int] | None = None) -> int:
    """Bytes one rank sends in one run-aligned two_phase call over segments of ``numels``
    (both phases; what the meter charges), from the shapes alone: ``rank``'s, or with
    ``rank=None`` the most any rank sends. ``offsets``: each segment's :func:`owner_offset`
    (default: its position). Needs ``compressor.payload_nbytes(numel)``."""
    if p <= 1:
        return 0
    C = owner_chunk(compressor)
    offsets = offsets if offsets is not None else list(range(len(numels)))
    to = [0] * p
    for n, o in zip(numels, offsets):
        for j, (a, b) in enumerate(owner_ranges(n, C, p, o % p)):
            to[j] += compressor.payload_nbytes(b - a) if b > a else 0
    total = sum(to)
    per = [total - to[j] + (p - 1) * to[j] for j in range(p)]  # phase 1: all but its own; phase 2: p - 1 copies
    return max(per) if rank is None else per[rank]
