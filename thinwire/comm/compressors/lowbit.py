"""Low-bit quantisers for pseudo-gradients and gradients: ``fp8`` (e4m3, one fp32 scale per
block) and ``int4`` (symmetric linear 4-bit, one fp32 scale per block). Aggregated by the
two-phase collective (like ``int8``), with an owner-side residual there (``owner_residual``):
the owner's re-quantisation error is kept and added to its next sum; worker-side error feedback
is ``comm.feedback`` (the presets: ``ef``).

``fp8``: the format torchft quantises DiLoCo's outer gradients to (per-row scales there; here
per block of ``block_size`` flattened elements, so any shape is handled alike): per block
s = max|x| / 448 (e4m3's largest finite value), code = fp8_e4m3fn(x / s) (round to nearest
even), x' = code * s. One byte per value + 4 bytes per block. Error: |x - x'| <= 2^-4 |x| for
|x| >= 2^-6 s (3 mantissa bits), <= 2^-10 s below (subnormals).

``int4``: per block s = max|x| / 7, q = round(x / s) in [-7, 7], sent as q + 8 (4 bits, two per
byte), x' = q s; |x - x'| <= s / 2. Half a byte per value + 4 bytes per block (``block_size``
256: 4.125 bits per value). Linear, not an e3m0-style float (Streaming DiLoCo's 4-bit outer
gradients): a float code spends its 16 levels on 8 octaves per sign, fine near 0 and coarse
near the block maximum; with a scale per 256 elements the block's range is already narrow,
and the linear grid's worst-case error s/2 = max|x|/14 is the smaller bound. Not measured
against e3m0 here.
"""
from __future__ import annotations

import torch

from .base import Compressor, Payload, blocks, check_block_size, pack_uint, unpack_uint

E4M3_MAX = 448.0


def _scales(xb: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale or 0) per row of ``xb``: max |x| / top."""
    s = xb.abs().amax(dim=1).div_(top)
    return s, torch.where(s > 0, 1.0 / s, torch.zeros_like(s))


def _decode(values: torch.Tensor, scales: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """(n,) fp32 values of their block times its scale."""
    nb = scales.numel()
    pad = nb * block_size - n
    v = torch.cat([values, values.new_zeros(pad)]) if pad else values
    return (v.view(nb, block_size) * scales.unsqueeze(1)).view(-1)[:n]


class FP8Compressor(Compressor):
    """``comm=fp8``: e4m3 codes with one fp32 scale per block (module docstring)."""

    name = "fp8"
    owner_residual = True

    def __init__(self, block_size: int = 2048, seed: int = 0):
        super().__init__(seed)
        self.block_size = check_block_size(self.name, block_size)

    def _compress(self, flat, shape, dtype, step):
        n = flat.numel()
        xb = blocks(flat, self.block_size)
        s, inv = _scales(xb, E4M3_MAX)
        y = (xb * inv.unsqueeze(1)).clamp_(-E4M3_MAX, E4M3_MAX).view(-1)[:n]
        codes = y.to(torch.float8_e4m3fn).view(torch.uint8)
        return Payload({"codes": codes, "scales": s}, shape, dtype)

    def _decompress(self, p):
        v = p.tensors["codes"].view(torch.float8_e4m3fn).float()
        return _decode(v, p.tensors["scales"], self.block_size, p.numel)

    def payload_nbytes(self, n: int) -> int:
        return n + 4 * -(-n // self.block_size)


class Int4Compressor(Compressor):
    """``comm=int4``: symmetric linear 4-bit codes with one fp32 scale per block (module
    docstring)."""

    name = "int4"
    owner_residual = True

    def __init__(self, block_size: int = 256, seed: int = 0):
        super().__init__(seed)
        self.block_size = check_block_size(self.name, block_size)

    def _compress(self, flat, shape, dtype, step):
        n = flat.numel()
        xb = blocks(flat, self.block_size)
        s, inv = _scales(xb, 7.0)
        q = (xb * inv.unsqueeze(1)).round_().clamp_(-7, 7).view(-1)[:n]
        q = torch.nan_to_num(q, nan=0.0).long().add_(8)
        return Payload({"codes": pack_uint(q, 4), "scales": s}, shape, dtype)

    def _decompress(self, p):
        n = p.numel
        q = unpack_uint(p.tensors["codes"], n, 4).sub_(8).float()
        return _decode(q, p.tensors["scales"], self.block_size, n)

    def payload_nbytes(self, n: int) -> int:
        return (n + 1) // 2 + 4 * -(-n // self.block_size)
