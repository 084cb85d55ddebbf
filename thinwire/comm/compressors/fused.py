"""Fused compress passes: error feedback + blockwise int8 / scaled sign + the local decode in
one compiled function, and the receiver's decode, for tensors whose length is a multiple of
the block.

The eager path (``quant.py``) runs a pass as separate kernels, each reading and writing the
whole tensor: q = g + e, |q|, the block maxima, q / s, round, clamp, the int8 cast, the
decode, e = q - local: at least 4.6x the bytes of a copy (the issue's measurement: int8 + EF
15x a memcpy on one CPU thread). Here each pass is written as whole-tensor torch ops and
compiled with ``torch.compile`` (Inductor fuses the elementwise work into the per-block
reductions, on CUDA as Triton kernels, on the CPU as C++ loops), so a pass reads g and e
once and writes the codes and the new e once: 13 B per element for int8 (the floor of a
pass that keeps e in fp32), and the receiver's decode 1 B in, 4 B out.

The math is the eager compressors', operation for operation (``Int8Compressor``:
Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", Eq. 1, s = max|x| /
127, q = round(x / s); ``Sign1Compressor``: Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD", Alg. 1, per block s = mean|x|, sign(0) = +1, signs packed 8 per byte MSB first),
and error feedback is ``ClassicEF`` with beta = 1 (Seide et al. 2014; EF-SGD, Karimireddy et
al. 2019, Alg. 2): q = g + e, send C(q), e <- q - C(q). ``tests/test_fused.py`` checks the
fused and the eager codes and residuals are equal; ``bench/compressors.py`` measures both
against a copy of the same bytes. Departure: no partial last block (the callers pad or fall
back to the eager path), since a ragged tail would need a second kernel.
"""
from __future__ import annotations

import functools

import torch

from ...errors import ConfigError


def int8_encode(x: torch.Tensor, block: int):
    """(codes int8 (n,), scales fp32 (n / block,)) of fp32 ``x`` (n,)."""
    xb = x.view(-1, block)
    s = xb.abs().amax(dim=1) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = (xb * inv.unsqueeze(1)).round().clamp(-127, 127)
    return codes.to(torch.int8).view(-1), s


def int8_decode(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    return (codes.view(-1, block).float() * scales.unsqueeze(1)).view(-1)


def sign_encode(x: torch.Tensor, block: int):
    """(signs uint8 (n / 8,), scales fp32 (n / block,)) of fp32 ``x`` (n,)."""
    xb = x.view(-1, block)
    s = xb.abs().sum(dim=1) / float(block)
    bits = (x >= 0).view(-1, 8).to(torch.uint8)
    packed = bits[:, 0] << 7                     # MSB first; shifts and ORs fuse into one kernel
    for i in range(1, 8):
        packed = packed | (bits[:, i] << (7 - i))
    return packed, s


def sign_decode(signs: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=signs.device)
    bits = (signs.unsqueeze(1) >> shifts).bitwise_and(1).view(-1, block)
    return ((bits.float() * 2.0 - 1.0) * scales.unsqueeze(1)).view(-1)


CODECS = {"int8": (int8_encode, int8_decode), "sign1": (sign_encode, sign_decode)}


def ef_pass(name: str, g: torch.Tensor, e: torch.Tensor, block: int):
    """Error feedback around codec ``name``: (codes, scales, new e) of q = g + e, with
    new e = q - decode(codes, scales) (what this rank owes after sending C(q))."""
    encode, decode = CODECS[name]
    q = g + e
    codes, s = encode(q, block)
    return codes, s, q - decode(codes, s, block)


def codec(name: str, device: torch.device):
    """(encode, decode, ef_pass) of codec ``name`` for tensors on ``device``: the hand-written
    Triton kernels on CUDA (:mod:`.fused_triton`, faster than Inductor's: docs/gpu.md), else
    this module's functions through ``torch.compile``."""
    if device.type == "cuda":
        try:
            from . import fused_triton
        except ImportError as e:  # triton ships with CUDA wheels of torch, not with every build
            raise ConfigError(f"comm.compile=true needs triton on CUDA ({e}); pip install triton, "
                              f"or set comm.compile=false") from None

        return (functools.partial(fused_triton.encode, name), functools.partial(fused_triton.decode, name),
                functools.partial(fused_triton.ef_pass, name))
    return compiled(name)


@functools.cache
def compiled(name: str):
    """(encode, decode, ef_pass) of codec ``name``, compiled once per process and tensor
    length (static shapes: with dynamic ones Inductor's CPU code for the EF pass was as slow
    as the eager ops; torch.compile keeps 8 lengths per function, then runs eager)."""
    encode, decode = CODECS[name]
    opts = dict(dynamic=False, fullgraph=True)
    return (torch.compile(encode, **opts), torch.compile(decode, **opts),
            torch.compile(functools.partial(ef_pass, name), **opts))
