"""Chunked Top-K with 2-bit values: the compressor of SparseLoCo (Sarfi, Therien, Lidin,
Belilovsky 2025, "Communication Efficient LLM Pre-training with SparseLoCo", arXiv 2508.15706,
Algorithm 1: the chunk-wise Top-k operator and the quantiser Q; production code: tplr-ai/templar,
``src/tplr/compress.py``)::

    view the flattened tensor as runs of C = ``chunk`` elements (the last run r < C elements)
    keep the k largest |x| of every full run, ceil(k r / C) of the last one (>= 2, <= r, <= k)
    indices: position inside the run, ceil(log2 C) bits each (12 for C = 4096), packed
    values:  one code book per tensor (``bits`` = 2, 4 or 8):
             mu = mean(v), s = std(v), bin width w = 6 s / 2^bits (the range is 6 sigma),
             code(v) = clamp(floor((v - mu) / w) + 2^bits / 2, 0, 2^bits - 1),
             code book[j] = mean of the values whose code is j      (decode: v' = book[code])
             or, with ``bits=16``, the values themselves in bf16 (no code book)
             or, with ``bits=1``, only their signs, one bit each, decoded as +-1 (DisTrO's
             1-bit values, as ``optim=demo`` sends its DCT coefficients; no code book)

Every full run costs the same k entries, so payloads have a size fixed by the tensor's
shape and the all-gather is uniform. At the defaults (C 4096, k 64, 2 bits) that is
12 + 2 = 14 bits per kept entry, 1.5625 % of the entries: 0.0273 bytes per parameter,
plus 16 bytes of code book per tensor. ``Payload.tensors`` holds exactly the packed
indices, the packed codes and the code book (no other scalar is needed: the bins' means
already include the centre mu), so ``nbytes`` is what crosses the wire.

Aggregation (``sparse``: all-gather of every rank's payload): with ``mean="contributors"``
(the default, the paper's and templar's choice: ``scatter_reduce(..., "mean",
include_self=False)``) each coordinate is averaged over the ranks that sent it; with
``mean="all"`` over all p ranks, as for ``topk``. The collective sums the ranks' payloads
in rank order into one fp32 buffer (and counts the contributors), so every rank gets
bitwise the same mean (see ``thinwire.comm.collectives.sparse_mean``). With
``comm.collective=two_phase`` (either mean) ownership is by whole runs, each owner re-selects k
per run of the mean it received and keeps an owner-side residual, and bytes per rank stay about
2 (p-1)/p of one payload (``collectives._two_phase_runs``, docs/comm.md).

Where this departs from the reference, and why:

- Runs, not tiles. templar's ``ChunkingTransformer`` tiles each dimension by its largest
  divisor <= ``target_chunk`` (64) and clamps k to the tile (k even, >= 2): a 2-D weight
  becomes 64 x 64 tiles, a 1-D vector runs of 64 with 32 kept (50 %). Tiles exist for the
  2-D DCT of DeMo; production runs with ``use_dct=false``, where tiles buy little over plain
  runs of C flattened elements and make the message size depend on the divisors of the
  shape. Runs of C keep the density k / C for every tensor (small ones can travel dense
  through ``comm.min_numel``).
- Symmetric bins. templar's quantiser (``_quantize_values``: centre by the mean, std with
  Bessel's correction, bin width ``range * std / bins`` with range 6, decode through the
  bins' means) rounds to bins centred on mu + j w, j = -2^b/2 .. 2^b/2 - 1, so at 2 bits
  every positive value above 0.5 w shares one bin while negative values get two. Here the
  bin edges are mu + j w (floor instead of round): two bins on each side of the mean, the
  same range, the same bins'-means decoding.
- Bit widths. Indices take ceil(log2 C) bits for any C (templar's packing is 12-bit only),
  and the values 2, 4 or 8 bits (templar: 8-bit, 256 bins) or bf16.

Selection is exact (the k largest |x| of every run) and vectorised; on CPU in two passes
that touch the tensor once: the maximum |x| of every group of 8 elements, the k groups
with the largest maxima (every one of the run's k largest elements lies in one of them:
an element outside them has k group maxima at least as large above it), then the k
largest of those k * 8 candidates. Ties at the k-th value may be broken either way.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Compressor, Payload, check_choice, pack_bits, pack_uint, uint_width, unpack_bits, unpack_uint

_GROUP = 8            # elements per group in the two-pass selection (a power of two: see the shifts)
_ROWS = 128           # runs per block of the first pass (a 2 MiB temporary at C = 4096)
_ABS = 0x7FFFFFFF     # |x| of an fp32 as its int32 bits: the order of magnitudes is the integer order
_RANGE_SIGMAS = 6.0   # the code book's range, in standard deviations of the kept values (templar's 6)
_BITS = (1, 2, 4, 8, 16)


def _largest_cols(a: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (rows, k) of the k largest entries of every row of ``a`` (int32 |x|
    bits), in no particular order. On CPU numpy's introselect (``argpartition``): about
    twice as fast as ``torch.topk``, which copies every row into a (value, index) queue."""
    if a.device.type == "cpu":
        n = a.shape[1]
        return torch.from_numpy(np.argpartition(a.numpy(), n - k, axis=1)[:, n - k:])
    return torch.topk(a, k, dim=1, sorted=False).indices


def _abs_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).bitwise_and(_ABS)


def _select_full_runs(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in their run, values), both (runs, k), of the k largest |x| of every row
    of ``x`` (runs, C)."""
    runs, C = x.shape
    if runs == 0:
        return torch.empty(0, k, dtype=torch.int64, device=x.device), x.new_empty(0, k)
    xi = x.view(torch.int32)
    if C % _GROUP or 2 * k * _GROUP > C:  # one pass over the whole run
        pos = _largest_cols(_abs_bits(x), k)
        return pos, torch.gather(x, 1, pos)
    groups = C // _GROUP
    gmax = torch.empty(runs, groups, dtype=torch.int32, device=x.device)
    step = _ROWS if x.device.type == "cpu" else runs  # cache-sized blocks on CPU
    buf = torch.empty(min(step, runs), C, dtype=torch.int32, device=x.device)
    for i in range(0, runs, step):
        b = buf[:min(step, runs - i)]
        torch.bitwise_and(xi[i:i + step], _ABS, out=b)
        torch.amax(b.view(-1, groups, _GROUP), dim=2, out=gmax[i:i + step])
    top = _largest_cols(gmax, k)                                   # (runs, k) group ids
    rows = torch.arange(runs, device=x.device).unsqueeze(1) * groups
    cand = torch.index_select(x.reshape(runs * groups, _GROUP), 0, (top + rows).reshape(-1))
    cand = cand.view(runs, k * _GROUP)                             # the k groups' elements
    pos = _largest_cols(_abs_bits(cand), k)                        # (runs, k) among them
    # group id * 8 + offset in the group, with shifts (8 is a power of two)
    return torch.gather(top, 1, pos >> 3).mul_(_GROUP).add_(pos & 7), torch.gather(cand, 1, pos)


class ChunkTopKCompressor(Compressor):
    """``comm=chunk_topk``: see the module docstring. Options: ``chunk`` (C), ``k`` (entries
    kept per full run), ``bits`` (2, 4, 8: code-book values; 16: bf16 values; 1: signs
    decoded as +-1), ``mean``
    (``contributors``: each coordinate averaged over the ranks that sent it; ``all``: over
    all ranks). Deterministic (``seed`` is unused)."""

    name = "chunk_topk"
    sparse = True
    owner_residual = True   # two_phase: the owner keeps what its re-selection did not send

    def __init__(self, chunk: int = 4096, k: int = 64, bits: int = 2, mean: str = "contributors",
                 seed: int = 0):
        super().__init__(seed)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 2 <= chunk <= 1 << 30:
            raise ValueError(f"{self.name}: chunk={chunk!r} must be an int in [2, 2**30]")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= chunk:
            raise ValueError(f"{self.name}: k={k!r} must be an int in [1, chunk={chunk}]")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
            raise ValueError(f"{self.name}: bits={bits!r} must be 2, 4 or 8 (code book), 16 (bf16 values) "
                             f"or 1 (signs, decoded as +-1)")
        self.chunk, self.k, self.bits = chunk, k, bits
        self.mean = check_choice(self.name, "mean", mean, {"contributors", "all"})
        self.contributors_mean = mean == "contributors"  # read by the sparse all-gather
        # two_phase owns whole runs (ownership.owner_ranges): every sender's selection in an
        # owner's range is its selection of those runs, and the owner re-selects k per run
        self.owner_chunk = chunk
        self.index_bits = uint_width(chunk)
        self._bases_cache: dict = {}     # (numel, device) -> _bases (the same for every call)

    # -- layout ------------------------------------------------------------------------
    def kept(self, n: int) -> tuple[int, int, int]:
        """(full runs, elements of the last partial run, entries kept in it) for n elements."""
        full, r = divmod(n, self.chunk)
        last = min(r, self.k, max(2, math.ceil(self.k * r / self.chunk))) if r else 0
        return full, r, last

    def payload_nbytes(self, n: int) -> int:
        """``compress(x).nbytes`` for x of n elements, from n alone (the accounting formulas)."""
        full, _, last = self.kept(n)
        m = full * self.k + last
        vals = {16: 2 * m, 1: (m + 7) // 8}.get(self.bits, (m * self.bits + 7) // 8 + 4 * (1 << self.bits))
        return (m * self.index_bits + 7) // 8 + vals

    def _bases(self, n: int, device) -> torch.Tensor:
        """The first element of the run of every kept entry, in payload order (cached)."""
        key = (n, str(device))
        if key not in self._bases_cache:
            self._bases_cache[key] = self._make_bases(n, device)
        return self._bases_cache[key]

    def _make_bases(self, n: int, device) -> torch.Tensor:
        full, r, last = self.kept(n)
        starts = torch.arange(full, device=device, dtype=torch.int64) * self.chunk
        bases = starts.repeat_interleave(self.k)
        if last:
            bases = torch.cat([bases, bases.new_full((last,), full * self.chunk)])
        return bases

    # -- values ------------------------------------------------------------------------
    def _quantise(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bits == 16:
            return {"values": v.to(torch.bfloat16)}
        if self.bits == 1:  # one bit per value: set for negative (0 and NaN decode as +1)
            return {"signs": pack_bits(v < 0)}
        bins = 1 << self.bits
        m = v.numel()
        mu = v.mean() if m else v.new_zeros(())
        c = v - mu
        std = c.norm() / math.sqrt(m - 1) if m > 1 else c.new_zeros(())
        width = std * (_RANGE_SIGMAS / bins)
        if not (math.isfinite(float(width)) and float(width) > 0):
            width = torch.ones((), device=v.device)
        # a NaN lands in the middle bin and poisons its mean, so it still decodes as NaN
        scaled = torch.nan_to_num(c / width, nan=0.0, posinf=bins, neginf=-bins)
        codes = torch.floor(scaled).add_(bins // 2).clamp_(0, bins - 1).long()
        # bins' means, summed in fp64 (index_add_ is sequential on CPU; in fp64 the order of
        # the accelerators' atomics does not show in the fp32 result)
        sums = torch.zeros(bins, dtype=torch.float64, device=v.device).index_add_(0, codes, v.double())
        counts = torch.bincount(codes, minlength=bins)
        book = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0).float()
        return {"codes": pack_uint(codes, self.bits), "codebook": book}

    def _values(self, p: Payload, m: int) -> torch.Tensor:
        if self.bits == 16:
            return p.tensors["values"].float()
        if self.bits == 1:
            return 1.0 - 2.0 * unpack_bits(p.tensors["signs"], m).float()
        return p.tensors["codebook"][unpack_uint(p.tensors["codes"], m, self.bits)]

    # -- the compressor ----------------------------------------------------------------
    def _compress(self, flat, shape, dtype, step):
        x = flat.float().contiguous()
        n = x.numel()
        full, r, last = self.kept(n)
        pos, v = _select_full_runs(x[:full * self.chunk].view(full, self.chunk), self.k)
        pos, v = pos.reshape(-1), v.reshape(-1)
        if last:
            tail = x[full * self.chunk:].view(1, r)
            tpos = _largest_cols(_abs_bits(tail), last)
            pos, v = torch.cat([pos, tpos.reshape(-1)]), torch.cat([v, torch.gather(tail, 1, tpos).reshape(-1)])
        t = {"indices": pack_uint(pos, self.index_bits)}
        t.update(self._quantise(v))
        return Payload(t, shape, dtype)

    def _entries(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """(global indices, values) of the entries a payload carries."""
        n = p.numel
        full, _, last = self.kept(n)
        m = full * self.k + last
        device = p.tensors["indices"].device
        idx = self._bases(n, device) + unpack_uint(p.tensors["indices"], m, self.index_bits)
        return idx, self._values(p, m)

    def _decompress(self, p):
        idx, v = self._entries(p)
        out = torch.zeros(p.numel, dtype=torch.float32, device=v.device)
        return out.index_put_((idx,), v)

    def accumulate(self, p, out, counts=None):
        """``out += decompress(p)``; with ``counts`` (fp32, like ``out``) also ``counts += 1``
        at every coordinate ``p`` carries (for the mean over contributors). A payload's
        indices are distinct, so each call is exact and independent of the device's order."""
        idx, v = self._entries(p)
        if counts is not None:
            counts.index_put_((idx,), torch.ones_like(v), accumulate=True)
        return out.index_add_(0, idx, v)
