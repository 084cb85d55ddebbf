# thinwire_examples/qsgd.py
"""QSGD: stochastic s-level quantisation (Alistarh et al. 2017, "QSGD: Communication-Efficient
SGD via Gradient Quantization and Encoding", Sec. 3.1), one norm per bucket of ``block_size``
values (the paper's bucketing), without its Elias coding of the codes::

    Q_s(v)_i = ||v||_2 * sign(v_i) * xi_i / s,   r = s |v_i| / ||v||_2,   l = floor(r),
    xi_i = l + 1 with probability r - l, else l          (so E[Q_s(v)] = v)

On the wire: one int8 code in [-s, s] per value, one fp32 norm per bucket.
"""
import torch

from thinwire.comm.compressors import Compressor, Payload
from thinwire.comm.compressors.base import blocks, check_block_size, generator


class QSGD(Compressor):
    name = "qsgd"  # neither summable nor sparse: aggregated by the two-phase quantised all-reduce

    def __init__(self, levels: int = 4, block_size: int = 512, seed: int = 0):
        super().__init__(seed)
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
            raise ValueError(f"qsgd: levels={levels!r} must be an int in [1, 127] (codes are int8)")
        self.levels = levels
        self.block_size = check_block_size(self.name, block_size)

    def _compress(self, flat, shape, dtype, step):
        n, s = flat.numel(), self.levels
        x = blocks(flat, self.block_size)  # fp32 (buckets, block_size), zero-padded
        norms = x.norm(dim=1)
        r = x.abs().mul_(s / norms.clamp_min(1e-30).unsqueeze(1))  # in [0, s]
        u = torch.rand(x.shape, generator=generator(self.seed, step, x.device), device=x.device)
        xi = r.add_(u).floor_().clamp_(max=s)  # floor(r + u): l + 1 with probability r - l
        codes = xi.mul_(x.sign()).to(torch.int8).view(-1)[:n]
        return Payload({"codes": codes, "norms": norms}, shape, dtype)

    def _decompress(self, p):
        codes = p.tensors["codes"]
        scale = (p.tensors["norms"] / self.levels).repeat_interleave(self.block_size)
        return codes.float() * scale[:codes.numel()]
