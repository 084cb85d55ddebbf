"""comm=fp8 and comm=int4 (issue 34): round trips within each format's bound against a
reference written from the format's definition, the error-feedback invariant, exact payload
bytes, and the two-phase collective against the single-process reference of
tests/test_collectives.py (gloo ranks: ``_check_two_phase``, run from tests/test_exchange.py's
rank pools)."""
import math

import pytest
import torch

from thinwire.comm.accounting import WireMeter
from thinwire.comm.aggregator import CompressedAggregator
from thinwire.comm.collectives import aggregate, chunk_numel, select_collective
from thinwire.comm.compressors import build_compressor

N = 10_007


def _x(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)   # heavy tails


def _e4m3_grid() -> torch.Tensor:
    """Every non-negative finite e4m3fn value, from its definition (bias 7, 3 mantissa bits,
    no infinities, S.1111.111 is NaN): subnormals m/8 * 2^-6, normals (1 + m/8) 2^(e-7)."""
    vals = [m / 8 * 2.0 ** -6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _ref_fp8(x, bs):
    grid = _e4m3_grid()
    out = torch.empty_like(x, dtype=torch.float64)
    for a in range(0, x.numel(), bs):
        b = x[a:a + bs].double()
        s = float(b.abs().max().float() / 448)
        if s == 0:
            out[a:a + bs] = 0
            continue
        y = (b.float() * (1.0 / torch.tensor(s, dtype=torch.float32))).double().clamp(-448, 448)
        i = torch.searchsorted(grid, y.abs()).clamp(max=grid.numel() - 1)
        lo, hi = grid[(i - 1).clamp(min=0)], grid[i]
        pick_hi = (hi - y.abs() < y.abs() - lo) | ((hi - y.abs() == y.abs() - lo) & (((i % 2) == 0)))
        out[a:a + bs] = torch.where(pick_hi, hi, lo) * y.sign() * s
    return out.float()


def _ref_int4(x, bs):
    out = torch.empty_like(x)
    for a in range(0, x.numel(), bs):
        b = x[a:a + bs]
        s = b.abs().max() / 7
        inv = 1.0 / s if s > 0 else torch.tensor(0.0)
        out[a:a + bs] = torch.round(b * inv).clamp(-7, 7) * s
    return out


@pytest.mark.parametrize("name,bs", [("fp8", 2048), ("fp8", 64), ("int4", 256), ("int4", 100)])
def test_round_trip_bound_bytes(name, bs):
    comp = build_compressor(name, block_size=bs)
    for n in [N, 1, 7, 2 * bs]:
        x = _x(n)
        pl = comp.compress(x)
        y = comp.decompress(pl)
        nb = math.ceil(n / bs)
        assert pl.nbytes == comp.payload_nbytes(n) == (n if name == "fp8" else (n + 1) // 2) + 4 * nb
        s = torch.cat([x[a:a + bs].abs().max().expand(min(bs, n - a)) for a in range(0, n, bs)])
        err = (x - y).abs()
        if name == "fp8":
            bound = torch.maximum(x.abs() * 2.0 ** -4, s / 448 * 2.0 ** -10) * (1 + 1e-5)
            torch.testing.assert_close(y, _ref_fp8(x, bs), rtol=1e-6, atol=0)
        else:
            bound = s / 7 / 2 * (1 + 1e-5)
            torch.testing.assert_close(y, _ref_int4(x, bs), rtol=1e-6, atol=0)
        assert bool((err <= bound).all()), float((err - bound).max())
    z = comp.decompress(comp.compress(torch.zeros(50)))
    assert torch.equal(z, torch.zeros(50))


@pytest.mark.parametrize("name", ["fp8", "int4"])
def test_error_feedback_and_two_phase_one_rank(name):
    """Through the aggregator (feedback=ef, two_phase, one process): the worker's residual is
    exactly q - C(q); the owner's is its sum minus what it sent; both kept and used next round."""
    comp = build_compressor(name)
    assert select_collective(comp) == "two_phase"
    agg = CompressedAggregator(name, {"feedback": "ef", "collective": "auto"}, WireMeter())
    x1, x2 = _x(N, 1), _x(N, 2)
    out1 = agg.launch(["w"], [x1], 0).wait()[0]
    agg.commit()
    sent = comp.decompress(comp.compress(torch.cat([x1, torch.zeros(chunk_numel(N, 1) - N)])))[:N]
    assert torch.equal(agg.feedback.store["w"]["e"], x1 - sent)
    owner = agg.server_errors["w"]
    torch.testing.assert_close(owner[:N] + out1, sent, rtol=1e-6, atol=1e-6)   # the owner's EF invariant
    out2 = agg.launch(["w"], [x2], 1).wait()[0]
    q2 = x2 + (x1 - sent)
    sent2 = comp.decompress(comp.compress(q2))
    torch.testing.assert_close(out2, comp.decompress(comp.compress(sent2 + owner[:N])), rtol=0, atol=0)
    # aggregate() with no buffers: one compress/decompress, twice
    torch.testing.assert_close(aggregate(x1, comp, WireMeter()), comp.decompress(comp.compress(sent)), rtol=0, atol=0)
