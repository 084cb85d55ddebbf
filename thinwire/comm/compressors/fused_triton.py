"""Hand-written Triton kernels for the int8 / sign1 error-feedback pass on CUDA: one program
per block of ``block`` values, which reads g and e once and writes the codes, the block's
scale and the new e once (the floor :mod:`.fused` describes), and the decode kernels.

``torch.compile`` of the same math (:mod:`.fused`) left int8 at 3.3x and sign1 at 5.0x a
device copy on an H200 (docs/gpu.md): Inductor splits the per-block reduction from the
elementwise work that follows it (two reads of g and e), and lowers sign's bit packing to
eight strided passes. Here the block's values stay in registers between the reduction and
the codes, and the 8 signs of a byte are packed by a sum over a reshaped (block / 8, 8) tile.

Math, operation for operation, as ``Int8Compressor`` (Dettmers et al. 2022, Eq. 1: s = max|x|
/ 127, codes = round-half-even(x / s) clamped to [-127, 127]) and ``Sign1Compressor``
(Karimireddy et al. 2019, Alg. 1, per block: s = mean|x|, sign(0) = +1, MSB first), with
classic error feedback (e <- q - C(q)). Departure: lengths must be a multiple of ``block``
(the callers fall back to the eager path otherwise). Needs ``triton`` (it ships with CUDA
builds of torch); imported only on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


_ROUNDER: tl.constexpr = tl.constexpr(12582912.0)


@triton.jit
def _int8_ef_kernel(g_ptr, e_ptr, codes_ptr, scales_ptr, e_out_ptr, HAS_E: tl.constexpr, B: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * B + tl.arange(0, B)
    q = tl.load(g_ptr + offs)
    if HAS_E:
        q += tl.load(e_ptr + offs)
    s = tl.max(tl.abs(q), axis=0) / 127.0
    inv = tl.where(s > 0, 1.0 / s, 0.0)
    # round half to even, as torch.round: adding and subtracting 1.5 * 2^23 leaves the nearest
    # integer of any |y| < 2^22 in fp32 arithmetic (here |y| <= 127 and a rounding error)
    c = tl.minimum(tl.maximum((q * inv + _ROUNDER) - _ROUNDER, -127.0), 127.0)
    tl.store(codes_ptr + offs, c.to(tl.int8))
    tl.store(scales_ptr + block, s)
    if HAS_E:
        tl.store(e_out_ptr + offs, q - c * s)


@triton.jit
def _int8_decode_kernel(codes_ptr, scales_ptr, out_ptr, B: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * B + tl.arange(0, B)
    s = tl.load(scales_ptr + block)
    tl.store(out_ptr + offs, tl.load(codes_ptr + offs).to(tl.float32) * s)


@triton.jit
def _sign_ef_kernel(g_ptr, e_ptr, signs_ptr, scales_ptr, e_out_ptr, HAS_E: tl.constexpr, B: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * B + tl.arange(0, B)
    q = tl.load(g_ptr + offs)
    if HAS_E:
        q += tl.load(e_ptr + offs)
    s = tl.sum(tl.abs(q), axis=0) / B
    positive = q >= 0
    weights = (1 << (7 - tl.arange(0, 8))).to(tl.int32)
    bits = tl.reshape(positive.to(tl.int32), (B // 8, 8)) * weights[None, :]
    tl.store(signs_ptr + block * (B // 8) + tl.arange(0, B // 8), tl.sum(bits, axis=1).to(tl.uint8))
    tl.store(scales_ptr + block, s)
    if HAS_E:
        tl.store(e_out_ptr + offs, q - tl.where(positive, s, -s))


@triton.jit
def _sign_decode_kernel(signs_ptr, scales_ptr, out_ptr, B: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    packed = tl.load(signs_ptr + block * (B // 8) + tl.arange(0, B // 8)).to(tl.int32)
    bits = (packed[:, None] >> (7 - tl.arange(0, 8))[None, :]) & 1
    s = tl.load(scales_ptr + block)
    values = tl.reshape(bits.to(tl.float32) * 2.0 - 1.0, (B,)) * s
    tl.store(out_ptr + block * B + tl.arange(0, B), values)


_KERNELS = {"int8": (_int8_ef_kernel, _int8_decode_kernel, 1), "sign1": (_sign_ef_kernel, _sign_decode_kernel, 8)}


def _launch_pass(name: str, g: torch.Tensor, e: torch.Tensor | None, block: int):
    ef_kernel, _, per_byte = _KERNELS[name]
    n = g.numel()
    codes = torch.empty(n // per_byte, dtype=torch.int8 if name == "int8" else torch.uint8, device=g.device)
    scales = torch.empty(n // block, dtype=torch.float32, device=g.device)
    e_out = torch.empty_like(g) if e is not None else None
    ef_kernel[(n // block,)](g, e if e is not None else g, codes, scales, e_out if e is not None else g,
                             HAS_E=e is not None, B=block, num_warps=8)
    return codes, scales, e_out


def encode(name: str, x: torch.Tensor, block: int):
    """(codes, scales) of fp32 ``x``: ``fused.CODECS[name][0]``'s contract."""
    codes, scales, _ = _launch_pass(name, x.contiguous(), None, block)
    return codes, scales


def decode(name: str, codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    _, decode_kernel, per_byte = _KERNELS[name]
    out = torch.empty(codes.numel() * per_byte, dtype=torch.float32, device=codes.device)
    decode_kernel[(scales.numel(),)](codes, scales, out, B=block, num_warps=8)
    return out


def ef_pass(name: str, g: torch.Tensor, e: torch.Tensor, block: int):
    """(codes, scales, new e) of q = g + e: ``fused.ef_pass``'s contract."""
    return _launch_pass(name, g.contiguous(), e.contiguous(), block)
