"""Dense casts: ``none`` (identity), ``fp16``, ``bf16``.  All summable.

fp16/bf16 are the casts of torch's ``fp16_compress_hook`` (Micikevicius et al. 2018,
"Mixed Precision Training"): x' = cast(x); the all-reduce divides by p *before* summing
so fp16 cannot overflow (done by the collective, see collectives.allreduce).
"""
from __future__ import annotations

import torch

from .base import Compressor, Payload


class NoneCompressor(Compressor):
    """Identity: the payload is the tensor itself, in its own dtype."""

    name = "none"
    summable = True

    def _compress(self, flat, shape, dtype, step):
        return Payload({"values": flat.contiguous()}, shape, dtype)

    def _decompress(self, p):
        return p.tensors["values"]


class _CastCompressor(Compressor):
    summable = True
    wire_dtype: torch.dtype

    def _compress(self, flat, shape, dtype, step):
        return Payload({"values": flat.to(self.wire_dtype).contiguous()}, shape, dtype)

    def _decompress(self, p):
        return p.tensors["values"]


class FP16Compressor(_CastCompressor):
    """IEEE half-precision cast (2 bytes/value); values beyond +-65504 become inf."""

    name = "fp16"
    wire_dtype = torch.float16


class BF16Compressor(_CastCompressor):
    """bfloat16 cast (2 bytes/value, fp32's exponent range, 8-bit mantissa)."""

    name = "bf16"
    wire_dtype = torch.bfloat16
