"""Compressors against their reference math (single process)."""
import math
import re

import pytest
import torch

from thinwire.comm.compressors import COMPRESSORS, build_compressor, dynamic8_codebook
from thinwire.comm.compressors.sparse import approx_topk_indices, decode_indices, encode_indices

ALL = sorted(COMPRESSORS)
SHAPES = [(1,), (7,), (3, 5), (2049,), (4, 3, 70)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _wire_bytes(name: str, n: int, dt: torch.dtype, kept: int) -> int:
    """What each format sends for n values of dtype ``dt`` at the defaults, from the format's
    description (the compressors' docstrings, docs/comm.md), not from the payload: ``kept``,
    the entries a sparse payload carries, is counted from its decompression."""
    blocks = math.ceil(n / 2048)  # int8 / dynamic8 / sign1: one fp32 scale per 2048 values
    return {"none": n * torch.empty(0, dtype=dt).element_size(),
            "fp16": 2 * n, "bf16": 2 * n,
            "int8": n + 4 * blocks, "dynamic8": n + 4 * blocks,
            "sign1": math.ceil(n / 8) + 4 * blocks,
            # fp8: one e4m3 byte per value, an fp32 scale per 2048; int4: two 4-bit codes per
            # byte, an fp32 scale per 256
            "fp8": n + 4 * blocks, "int4": math.ceil(n / 2) + 4 * math.ceil(n / 256),
            # randk: the values only, in the input's dtype (indices come from the shared seed)
            "randk": kept * torch.empty(0, dtype=dt).element_size(),
            # topk: fp32 value + 16-bit offset per entry, an int32 count per 65536 positions
            "topk": kept * (4 + 2) + 4 * math.ceil(n / 65536),
            # ternary: a sign bit and an int32 index per entry, one fp32 magnitude
            "ternary": math.ceil(kept / 8) + 4 * kept + 4,
            # chunk_topk: a 12-bit position and a 2-bit code per entry, a 4-entry fp32 code book
            "chunk_topk": math.ceil(12 * kept / 8) + math.ceil(2 * kept / 8) + 4 * 4}[name]


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_nbytes_zero_and_determinism(name):
    from thinwire.comm.collectives import pack, unpack

    g = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        for dt in DTYPES:
            t = torch.randn(shape, generator=g).to(dt)
            c = build_compressor(name, seed=3)
            p = c.compress(t, step=5)
            out = c.decompress(p)
            assert out.shape == t.shape and out.dtype == t.dtype
            kept = int((out != 0).sum()) if (c.sparse or name == "randk") else t.numel()
            assert p.nbytes == _wire_bytes(name, t.numel(), dt, kept) and isinstance(p.nbytes, int), \
                (shape, dt, {k: (v.dtype, v.numel()) for k, v in p.tensors.items()})
            # the payload serialised as the collectives send it: nbytes bytes, and enough to decode
            buf = pack(p)
            assert buf.dtype == torch.uint8 and buf.numel() == p.nbytes
            assert torch.equal(c.decompress(unpack(buf.clone(), p)), out)
            assert all(x.dim() == 1 and x.is_contiguous() for x in p.tensors.values())
            again = build_compressor(name, seed=3).decompress(
                build_compressor(name, seed=3).compress(t, step=5))
            assert torch.equal(out, again)
            z = c.decompress(c.compress(torch.zeros(shape, dtype=dt)))
            assert torch.isfinite(z).all() and (z == 0).all()


def test_unknown_name_and_bad_kwargs():
    with pytest.raises(ValueError, match="valid names: .*topk"):
        build_compressor("nope")
    with pytest.raises(ValueError, match="bogus=1"):
        build_compressor("topk", bogus=1)
    for name, kw in [("topk", {"ratio": 0}), ("topk", {"ratio": 1.5}), ("randk", {"ratio": "x"}),
                     ("int8", {"block_size": 0}), ("int8", {"stochastic": "yes"}),
                     ("topk", {"value_dtype": "fp8"}), ("topk", {"index_coding": "zip"}),
                     ("ternary", {"alpha": -1.0}), ("sign1", {"seed": 1.5})]:
        (key, value), = kw.items()
        # the value as typed (strings bare or quoted), named with its key
        with pytest.raises(ValueError, match=f"{key}=(?:{re.escape(repr(value))}|{re.escape(str(value))})"):
            build_compressor(name, **kw)


def test_algebra_flags():
    assert {n for n, c in COMPRESSORS.items() if c.summable} == {"none", "fp16", "bf16", "randk"}
    assert {n for n, c in COMPRESSORS.items() if c.sparse} == {"topk", "ternary", "chunk_topk"}
    assert {n for n, c in COMPRESSORS.items() if not (c.sparse or c.summable)} == \
        {"int8", "dynamic8", "sign1", "fp8", "int4"}


def test_dense_casts():
    t = torch.randn(1000)
    assert torch.equal(build_compressor("none").decompress(build_compressor("none").compress(t)), t)
    for name, dt in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        p = build_compressor(name).compress(t)
        assert p.tensors["values"].dtype == dt and p.nbytes == 2000
        assert torch.equal(build_compressor(name).decompress(p), t.to(dt).float())


@pytest.mark.parametrize("coding", ["none", "offset16"])
def test_exact_topk_matches_reference(coding):
    t = torch.randn(200_003)
    c = build_compressor("topk", ratio=0.01, value_dtype="fp32", index_coding=coding)
    p = c.compress(t)
    k = math.ceil(0.01 * t.numel())
    ref = set(torch.topk(t.abs(), k).indices.tolist())
    idx = decode_indices(p.tensors)
    assert idx.numel() == k and set(idx.tolist()) == ref
    out = c.decompress(p)
    exp = torch.zeros_like(t)
    exp[list(ref)] = t[list(ref)]
    assert torch.equal(out, exp)
    bytes_per_entry = 8 if coding == "none" else 6
    assert p.nbytes == k * bytes_per_entry + (0 if coding == "none" else 4 * 4)


def test_index_coding_round_trip_and_scaled_fp16_values():
    n = 300_000
    idx = torch.randperm(n)[:5000]
    assert torch.equal(decode_indices(encode_indices(idx, n, "offset16")), idx.sort().values)
    assert build_compressor("topk").value_dtype == "fp32"  # the default; fp16 is asked for
    for coding, index_bytes in (("none", 4), ("offset16", 2)):
        c = build_compressor("topk", ratio=0.05, value_dtype="fp16", index_coding=coding)
        for big, small in ((1e6, 3e5), (1e-7, 4e-8)):  # beyond fp16's range at both ends
            t = torch.zeros(100)
            t[3], t[7] = big, -small
            p = c.compress(t)
            assert p.tensors["values"].dtype == torch.float16 and "scale" in p.tensors
            assert p.tensors["values"].abs().max() == 1  # scaled: the largest |value| maps to 1
            out = c.decompress(p)
            torch.testing.assert_close(out, t, rtol=2 ** -11, atol=0)  # fp16 precision, relative to the max
            # fp16 values + the indices + one fp32 scale (+ one int32 count per 65536 positions)
            assert p.nbytes == 5 * (2 + index_bytes) + 4 + (4 if coding == "offset16" else 0)
            # unscaled fp16 would not: 1e6 overflows to inf, 4e-8 falls among fp16's subnormals
            assert not torch.allclose(t.half().float(), t, rtol=2 ** -11, atol=0)
        # the fp16 path through accumulate (what the sparse all-gather calls) agrees
        t = torch.randn(3000)
        p = c.compress(t)
        assert torch.allclose(c.accumulate(p, torch.ones(3000)), 1 + c.decompress(p))


def test_approximate_topk_keeps_true_entries_and_exactly_k():
    g = torch.Generator().manual_seed(0)
    for dist_ in ["normal", "heavy", "sparse"]:
        t = torch.randn(1 << 20, generator=g)
        if dist_ == "heavy":
            t = t ** 3
        if dist_ == "sparse":
            t[torch.rand(t.shape, generator=g) < 0.9] = 0
        for ratio in [0.001, 0.01, 0.05]:
            c = build_compressor("topk", ratio=ratio, approximate=True, value_dtype="fp32")
            p = c.compress(t, step=1)
            k = math.ceil(ratio * t.numel())
            idx = decode_indices(p.tensors)
            assert idx.numel() == k and idx.unique().numel() == k
            true = torch.zeros(t.numel(), dtype=torch.bool)
            true[torch.topk(t.abs(), k).indices] = True
            hits = int(true[idx].sum())
            assert 0.5 * k <= hits <= k, (dist_, ratio, hits, k)
            assert torch.equal(p.tensors["values"], t[idx])


def test_approximate_topk_padding_path():
    # a threshold far too high forces the pad / re-estimate paths; still exactly k
    a = torch.rand(1 << 19)
    g = torch.Generator().manual_seed(0)
    idx = approx_topk_indices(a, 5000, g, oversample=0.7)
    assert idx.numel() == 5000 and idx.unique().numel() == 5000


def test_randk_shared_indices_unbiased_and_summable():
    n = 10_000
    a, b = torch.randn(n), torch.randn(n)
    for sampling in ["stratified", "uniform"]:
        c = build_compressor("randk", ratio=0.1, seed=7, sampling=sampling)
        pa, pb = c.compress(a, step=3), c.compress(b, step=3)
        assert pa.nbytes == 1000 * 4 and set(pa.tensors) == {"values"}
        ia, _ = c.indices(n, 3, "cpu")
        assert ia.unique().numel() == 1000
        # summable: decompress(sum of payloads) == sum of decompressions
        pa.tensors["values"] = pa.tensors["values"] + pb.tensors["values"]
        assert torch.allclose(c.decompress(pa), c.decompress(c.compress(a, step=3))
                              + c.decompress(c.compress(b, step=3)))
        assert not torch.equal(c.indices(n, 4, "cpu")[0], ia)
    cu = build_compressor("randk", ratio=0.1, unbiased=True)
    x = torch.randn(1000)
    mean = torch.stack([cu.decompress(cu.compress(x, step=s)) for s in range(3000)]).mean(0)
    assert (mean - x).abs().max() < 0.35 * x.abs().max()
    assert (mean - x).norm() < 0.1 * x.norm()


def test_randk_step_counter():
    c = build_compressor("randk", ratio=0.1)
    x = torch.randn(1000)
    p0, p1 = c.compress(x), c.compress(x)
    assert (p0.meta["step"], p1.meta["step"]) == (0, 1)
    c.set_step(0)
    assert torch.equal(c.compress(x).tensors["values"], p0.tensors["values"])


@pytest.mark.parametrize("n", [5, 2048, 5000])
def test_int8_round_to_nearest_bound(n):
    t = torch.randn(n) * torch.logspace(-3, 2, n)
    c = build_compressor("int8", block_size=256)
    p = c.compress(t)
    nb = math.ceil(n / 256)
    assert p.tensors["codes"].dtype == torch.int8 and p.tensors["codes"].numel() == n
    assert p.nbytes == n + 4 * nb
    scale = torch.cat([t, t.new_zeros(nb * 256 - n)]).view(nb, 256).abs().amax(1) / 127
    err = (c.decompress(p) - t).abs()
    bound = scale.repeat_interleave(256)[:n] / 2
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()


def test_int8_stochastic_unbiased():
    t = torch.randn(512)
    c = build_compressor("int8", block_size=128, stochastic=True, seed=11)
    outs = torch.stack([c.decompress(c.compress(t, step=s)) for s in range(2000)])
    scale = t.view(4, 128).abs().amax(1).repeat_interleave(128) / 127
    assert ((outs - t).abs() <= scale * (1 + 1e-5)).all()
    # mean error shrinks like 1/sqrt(2000): well under a tenth of a quantisation step
    assert ((outs.mean(0) - t).abs() <= 0.1 * scale).all()


def test_dynamic8_codebook_and_bound():
    book = dynamic8_codebook()
    assert book.numel() == 256 and (book[1:] > book[:-1]).all()
    assert book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    t = torch.randn(5000) * torch.logspace(-4, 1, 5000)
    c = build_compressor("dynamic8", block_size=512)
    p = c.compress(t)
    assert p.tensors["codes"].dtype == torch.uint8 and p.nbytes == 5000 + 4 * 10
    out = c.decompress(p)
    codes = p.tensors["codes"].long()
    gap = torch.cat([book[1:] - book[:-1], book.new_zeros(1)])
    gap_lo = torch.cat([book.new_zeros(1), book[1:] - book[:-1]])
    absmax = torch.cat([t, t.new_zeros(120)]).view(10, 512).abs().amax(1).repeat_interleave(512)[:5000]
    half = torch.maximum(gap[codes], gap_lo[codes]) / 2 * absmax
    assert ((out - t).abs() <= half * (1 + 1e-4) + 1e-12).all()
    # the dynamic type keeps small values that linear int8 flushes to zero
    i8 = build_compressor("int8", block_size=512)
    small = t.abs() < 1e-2 * absmax
    err_d = (out - t)[small].norm()
    err_i = (i8.decompress(i8.compress(t)) - t)[small].norm()
    assert err_d < 0.5 * err_i


def test_sign1_packing_and_scale():
    t = torch.randn(2050)
    c = build_compressor("sign1", block_size=1024)
    p = c.compress(t)
    assert p.tensors["signs"].dtype == torch.uint8 and p.tensors["signs"].numel() == 257
    assert p.nbytes == 257 + 3 * 4
    scale = torch.stack([t[:1024].abs().mean(), t[1024:2048].abs().mean(), t[2048:].abs().mean()])
    assert torch.allclose(p.tensors["scales"], scale)
    sign = torch.where(t >= 0, 1.0, -1.0)
    assert torch.allclose(c.decompress(p), sign * scale.repeat_interleave(1024)[:2050])


def test_ternary():
    t = torch.randn(10_000)
    k = 100
    for alpha in [None, 2.0]:
        c = build_compressor("ternary", ratio=0.01, alpha=alpha)
        p = c.compress(t)
        assert p.nbytes == math.ceil(k / 8) + 4 * k + 4
        out = c.decompress(p)
        top = torch.topk(t.abs(), k).indices
        gamma = t[top].abs().mean() if alpha is None else alpha * t.std(correction=0)
        exp = torch.zeros_like(t)
        exp[top] = torch.sign(t[top]) * gamma
        assert torch.allclose(out, exp)
    c = build_compressor("ternary", ratio=0.01, index_coding="offset16")
    assert torch.allclose(c.decompress(c.compress(t)),
                          build_compressor("ternary", ratio=0.01).decompress(
                              build_compressor("ternary", ratio=0.01).compress(t)))


def test_accumulate_equals_decompress():
    t = torch.randn(3000)
    for name in ALL:
        c = build_compressor(name)
        p = c.compress(t, step=2)
        acc = torch.ones(3000)
        assert torch.allclose(c.accumulate(p, acc), 1 + c.decompress(p).float()), name


def test_entry_point_plugin(monkeypatch):
    import thinwire.comm.compressors as mod

    class EP:
        name = "mine"

        def load(self):
            class Mine(mod.NoneCompressor):
                name = "mine"

                def __init__(self, gain: float = 1.0, seed: int = 0):
                    super().__init__(seed)
                    self.gain = gain
            return Mine

    import thinwire.registry as registry

    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == mod.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(mod.COMPRESSORS, "_loaded_entry_points", False)
    monkeypatch.setattr(mod.COMPRESSORS, "_items", dict(mod.COMPRESSORS._items))
    c = build_compressor("mine", gain=2.0)
    assert c.gain == 2.0
    with pytest.raises(ValueError, match="mine"):
        build_compressor("other")
