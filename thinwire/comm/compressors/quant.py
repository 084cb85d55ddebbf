"""Quantisers: ``int8`` (blockwise absmax), ``dynamic8`` (Dettmers' dynamic type),
``sign1`` (blockwise scaled sign).  Aggregated by the two-phase collective.

Blocks: the flat tensor is cut into blocks of ``block_size`` values (the last one
partial); each block carries one fp32 scale.  Only the n real codes are sent, never
the padding of the last block.
"""
from __future__ import annotations

import torch

from . import fused
from .base import Compressor, Payload, blocks, check_block_size, check_bool, generator


_CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32: CPU work is done chunk by chunk, in cache


def _rows_per_chunk(t: torch.Tensor, block_size: int, nblocks: int) -> int:
    """Blocks per chunk: ~1 MiB on CPU (cache-resident temporaries, no 64 MiB
    allocations and their page faults), everything at once on accelerators."""
    if t.device.type != "cpu":
        return max(1, nblocks)
    return max(1, _CHUNK_ELEMS // block_size)


def _per_block(codes: torch.Tensor, scales: torch.Tensor, block_size: int,
               lut: torch.Tensor | None = None, n: int | None = None, decode=None) -> torch.Tensor:
    """(n,) codes -> (lut[codes] or codes) * scale of their block, (n,) fp32.
    ``decode(start, end, dst)``, if given, writes the values of elements [start, end)."""
    n = codes.numel() if n is None else n
    nb = scales.numel()
    full = n // block_size
    out = torch.empty(nb * block_size, dtype=torch.float32, device=codes.device)
    ov = out.view(nb, block_size)
    rows = _rows_per_chunk(codes, block_size, nb)

    if decode is None:
        def decode(a, b, dst):
            dst.copy_(codes[a:b] if lut is None else lut[codes[a:b].long()])

    for i in range(0, full, rows):
        j = min(full, i + rows)
        dst = ov[i:j]
        decode(i * block_size, j * block_size, dst.view(-1))
        dst.mul_(scales[i:j].unsqueeze(1))
    if full < nb:                                   # the partial last block
        tail = out[full * block_size:n]
        decode(full * block_size, n, tail)
        tail.mul_(scales[full])
    return out[:n]


def _absmax(xb: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(xb, dim=1)
    return torch.maximum(hi, -lo)


class Int8Compressor(Compressor):
    """Blockwise absmax int8 (Dettmers 2015, "8-Bit Approximations for Parallelism",
    linear 8-bit baseline; blockwise as in Dettmers et al. 2022, "8-bit Optimizers via
    Block-wise Quantization", Eq. 1): per block s = max|x| / 127, q = round(x / s) in
    [-127, 127], x' = q s, so |x - x'| <= s / 2 per element.

    ``stochastic=True``: q = floor(x / s + u), u ~ U[0, 1) from the seeded generator,
    so E[x'] = x (unbiased; |x - x'| < s).  Give each rank its own seed (e.g. seed + rank)
    so the rounding errors of different ranks are independent and average out.

    ``compile=True``: the same math in one kernel per direction (:mod:`.fused`: Triton kernels
    on CUDA, ``torch.compile`` on the CPU) for tensors whose length is a multiple of
    ``block_size``; others, and stochastic rounding, take the eager path.
    """

    name = "int8"

    def __init__(self, block_size: int = 2048, stochastic: bool = False, seed: int = 0, compile: bool = False):
        super().__init__(seed)
        self.block_size = check_block_size(self.name, block_size)
        self.stochastic = check_bool(self.name, "stochastic", stochastic)
        self.compile = check_bool(self.name, "compile", compile)

    def _compiled(self, n: int) -> bool:
        return self.compile and not self.stochastic and n % self.block_size == 0

    def _compress(self, flat, shape, dtype, step):
        n, bs = flat.numel(), self.block_size
        if self._compiled(n):
            codes, scales = fused.codec(self.name, flat.device)[0](flat.float(), bs)
            return Payload({"codes": codes, "scales": scales}, shape, dtype)
        xb = blocks(flat, bs)
        nb = xb.shape[0]
        scale = torch.empty(nb, dtype=torch.float32, device=xb.device)
        q = torch.empty(nb, bs, dtype=torch.int8, device=xb.device)
        rows = _rows_per_chunk(xb, bs, nb)
        buf = torch.empty(min(rows, nb), bs, dtype=torch.float32, device=xb.device)
        gen = generator(self.seed, step, xb.device) if self.stochastic else None
        for i in range(0, nb, rows):
            x, b, s = xb[i:i + rows], buf[:min(rows, nb - i)], scale[i:i + rows]
            torch.amax(torch.abs(x, out=b), dim=1, out=s)
            s.div_(127.0)
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            torch.mul(x, inv.unsqueeze(1), out=b)
            if gen is not None:   # floor(y + u), u ~ U[0, 1): unbiased
                b.add_(torch.rand(b.shape, generator=gen, device=b.device)).floor_()
            else:
                b.round_()
            q[i:i + rows].copy_(b.clamp_(-127, 127))
        return Payload({"codes": q.view(-1)[:n], "scales": scale}, shape, dtype)

    def _decompress(self, p):
        if self._compiled(p.numel):
            return fused.codec(self.name, p.tensors["codes"].device)[1](p.tensors["codes"], p.tensors["scales"],
                                                                     self.block_size)
        return _per_block(p.tensors["codes"], p.tensors["scales"], self.block_size)


def dynamic8_codebook() -> torch.Tensor:
    """The 256 values of Dettmers' 8-bit dynamic data type (2015, Sec. 3.1, Fig. 1),
    sorted, in [-1, 1].

    Layout of a code: 1 sign bit; then e zero bits (the exponent: magnitude 10^-e);
    then an indicator 1 bit; the remaining 6 - e bits are a linear fraction
    f in (0.1, 1]: magnitude = 10^-e * (0.1 + 0.9 (j + 1) / 2^(6-e)), j = 0 .. 2^(6-e) - 1.
    With e = 0 .. 6 that is 127 magnitudes per sign, from 1e-6 to exactly 1.0 (absmax
    maps to itself).  The all-zero magnitude is 0 (sign bit clear); the spare
    "negative zero" code is used for +1e-7 (e = 7, no fraction bits), so the book has
    256 distinct, strictly increasing values.  We store a code as its rank in this
    sorted book (a bijection with the bit layout).
    """
    mags = []
    for e in range(7):
        m = 2 ** (6 - e)
        j = torch.arange(m, dtype=torch.float64)
        mags.append(10.0 ** -e * (0.1 + 0.9 * (j + 1) / m))
    mags = torch.cat(mags)
    book = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags,
                      torch.tensor([1e-7], dtype=torch.float64)])
    return torch.sort(book).values.float()


_BOOK = dynamic8_codebook()
_MIDS = (_BOOK[1:] + _BOOK[:-1]) / 2


class Dynamic8Compressor(Compressor):
    """Dettmers' 8-bit dynamic data type (2015, "8-Bit Approximations for Parallelism",
    Sec. 3.1) with blockwise absmax normalisation: y = x / max|x| in [-1, 1],
    code = nearest value of :func:`dynamic8_codebook` (``torch.bucketize`` on the
    midpoints), x' = book[code] * max|x|.  Relative precision is about 1.4 % over five
    decades, where linear int8 loses small values entirely."""

    name = "dynamic8"

    def __init__(self, block_size: int = 2048, seed: int = 0):
        super().__init__(seed)
        self.block_size = check_block_size(self.name, block_size)

    def _compress(self, flat, shape, dtype, step):
        n = flat.numel()
        xb = blocks(flat, self.block_size)
        absmax = _absmax(xb)
        inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        y = (xb * inv.unsqueeze(1)).view(-1)[:n]
        codes = torch.bucketize(y, _MIDS.to(y.device)).to(torch.uint8)
        return Payload({"codes": codes, "scales": absmax}, shape, dtype)

    def _decompress(self, p):
        codes = p.tensors["codes"]
        return _per_block(codes, p.tensors["scales"], self.block_size, _BOOK.to(codes.device))


_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class Sign1Compressor(Compressor):
    """Blockwise scaled sign (Karimireddy et al. 2019, "Error Feedback Fixes SignSGD",
    Alg. 1: C(x) = ||x||_1 / d * sign(x), here per block as in 1-bit Adam): per block
    s = mean |x|, x' = s * sign(x) with sign(0) = +1; signs packed 8 per byte (uint8,
    MSB first), one fp32 scale per block.  Biased; use with error feedback - the
    two-phase collective keeps a server-side error buffer by default.  ``compile=True``: as
    ``Int8Compressor``'s (lengths that are a multiple of ``block_size`` and of 8)."""

    name = "sign1"
    server_error_default = True

    def __init__(self, block_size: int = 2048, seed: int = 0, compile: bool = False):
        super().__init__(seed)
        self.block_size = check_block_size(self.name, block_size)
        self.compile = check_bool(self.name, "compile", compile)

    def _compiled(self, n: int) -> bool:
        return self.compile and n % self.block_size == 0 and n % 8 == 0

    def _compress(self, flat, shape, dtype, step):
        n, bs = flat.numel(), self.block_size
        if self._compiled(n):
            signs, scales = fused.codec(self.name, flat.device)[0](flat.float(), bs)
            return Payload({"signs": signs, "scales": scales}, shape, dtype)
        xb = blocks(flat, bs)
        nb = xb.shape[0]
        sums = torch.empty(nb, dtype=torch.float32, device=xb.device)
        rows = _rows_per_chunk(xb, bs, nb)
        buf = torch.empty(min(rows, nb), bs, dtype=torch.float32, device=xb.device)
        for i in range(0, nb, rows):
            x = xb[i:i + rows]
            torch.sum(torch.abs(x, out=buf[:x.shape[0]]), dim=1, out=sums[i:i + rows])
        counts = torch.full((nb,), float(bs), device=xb.device)
        counts[-1] = n - (nb - 1) * bs
        xf = xb.view(-1)                             # padding zeros count as +, never read
        nbytes = (n + 7) // 8
        packed = torch.empty(nbytes, dtype=torch.uint8, device=xb.device)
        w = _WEIGHTS.to(xb.device)
        step_b = _rows_per_chunk(xb, 8, nbytes)      # bytes per chunk
        for a in range(0, nbytes, step_b):
            b = min(nbytes, a + step_b)
            bits = (xf[a * 8:b * 8] >= 0).view(-1, 8).to(torch.uint8)
            torch.sum(bits.mul_(w), dim=1, dtype=torch.uint8, out=packed[a:b])
        return Payload({"signs": packed, "scales": sums.div_(counts)}, shape, dtype)

    def _decompress(self, p):
        packed = p.tensors["signs"]
        if self._compiled(p.numel):
            return fused.codec(self.name, packed.device)[1](packed, p.tensors["scales"], self.block_size)
        shifts = _SHIFTS.to(packed.device)

        def decode(a, b, dst):                       # elements [a, b) -> +-1 in dst
            lo = a // 8
            bits = (packed[lo:(b + 7) // 8].unsqueeze(1) >> shifts).bitwise_and_(1)
            dst.copy_(bits.view(-1)[a - lo * 8:b - lo * 8]).mul_(2).sub_(1)
        return _per_block(packed, p.tensors["scales"], self.block_size, n=p.numel, decode=decode)
