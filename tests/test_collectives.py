"""Collectives on 2, 3 and 4 gloo ranks against single-process references: the code production
runs (``collectives.launch``), through its one-tensor front door and with several segments.

One spawn per world size runs every check (process start-up dominates the cost)."""
import math

import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from thinwire.comm.accounting import WireMeter, collective_bytes
from thinwire.comm.collectives import (aggregate, aggregate_async, chunk_numel, launch, new_server_error,
                                       segment_step, select_collective)
from thinwire.comm.compressors import build_compressor

N = 10_007  # not a multiple of anything


def _inputs(p, n=N):
    return [torch.randn(n, generator=torch.Generator().manual_seed(100 + r)) for r in range(p)]


def _ref_two_phase(xs, comp, errs=None, step=None):
    """Single-process two-phase: the same compress / fp32 sum / re-compress per chunk."""
    p, n = len(xs), xs[0].numel()
    c = chunk_numel(n, p)
    out = []
    for j in range(p):
        cs = None if step is None else step * (p + 1) + j
        acc = torch.zeros(c)
        for x in xs:
            padded = torch.zeros(p * c)
            padded[:n] = x
            comp.accumulate(comp.compress(padded[j * c:(j + 1) * c], step=cs), acc)
        acc /= p
        if errs is not None:
            acc += errs[j]
        pl = comp.compress(acc, step=None if step is None else step * (p + 1) + p)
        dec = comp.decompress(pl)
        if errs is not None:
            errs[j] = acc - dec
        out.append(dec)
    return torch.cat(out)[:n]


def _check(rank, p):
    xs = _inputs(p)
    x = xs[rank]
    mean = torch.stack(xs).mean(0)
    meter = WireMeter()
    group2 = dist.new_group(list(range(p)))

    # dense all-reduce == plain mean; bytes = ring formula of the payload dtype
    for name, tol, b in [("none", 1e-6, 4), ("fp16", 2e-3, 2), ("bf16", 2e-2, 2)]:
        out = aggregate(x, build_compressor(name), meter)
        torch.testing.assert_close(out, mean, atol=tol, rtol=tol)
        assert out.dtype == x.dtype
        assert meter.take_step()["data"] == collective_bytes("all_reduce", N, b, p)
    # fp16 input, fp16 payload: divide-before-sum keeps it finite
    big = torch.full((64,), 60000.0, dtype=torch.float16)
    assert torch.isfinite(aggregate(big, build_compressor("fp16"), meter)).all()
    meter.take_step()

    # rand-k all-reduce == mean of the decompressed payloads (same indices on every rank)
    rk = build_compressor("randk", ratio=0.05, seed=5, unbiased=True)
    out = aggregate(x, rk, meter, step=9)
    ref = torch.stack([rk.decompress(rk.compress(xi, step=9)) for xi in xs]).mean(0)
    torch.testing.assert_close(out, ref)
    assert meter.take_step()["data"] == collective_bytes("all_reduce", math.ceil(0.05 * N), 4, p)

    # sparse all-gather == sum of decompressed payloads / p
    for name, kw in [("topk", {}), ("topk", {"index_coding": "offset16", "value_dtype": "fp32"}),
                     ("ternary", {}), ("int8", {})]:
        comp = build_compressor(name, **kw)
        coll = "allgather" if name == "int8" else "auto"
        out = aggregate(x, comp, meter, collective=coll)
        ref = torch.stack([comp.decompress(comp.compress(xi)).float() for xi in xs]).sum(0) / p
        torch.testing.assert_close(out, ref)
        nb = comp.compress(x).nbytes
        assert meter.take_step()["data"] == (p - 1) * nb

    # two-phase == single-process reference; bytes 2(p-1) B, B = bytes of one chunk
    c = chunk_numel(N, p)
    for name, kw, step in [("int8", {}, None), ("int8", {"stochastic": True, "block_size": 512}, 4),
                           ("dynamic8", {}, None), ("sign1", {}, None)]:
        comp = build_compressor(name, **kw)
        err = new_server_error(N, comp)
        assert (err is not None) == (name == "sign1")
        errs = [torch.zeros(c) for _ in range(p)] if err is not None else None
        for it in range(2):  # twice, so the server error buffer feeds back
            s = None if step is None else step + it
            out = aggregate(x, comp, meter, server_error=err, step=s)
            ref = _ref_two_phase(xs, comp, errs, step=s)
            torch.testing.assert_close(out, ref)
            if err is not None:
                torch.testing.assert_close(err, errs[rank])
        B = comp.compress(torch.zeros(c)).nbytes
        assert meter.take_step()["data"] == 2 * 2 * (p - 1) * B
        bits = {"int8": 8, "dynamic8": 8, "sign1": 1}[name]
        scales = 4 * math.ceil(c / comp.block_size)
        approx = 2 * (p - 1) / p * (p * c) * bits / 8 + 2 * (p - 1) * scales
        assert abs(2 * (p - 1) * B - approx) <= 2 * p, (name, B, approx)
    # several segments in one two_phase call with server-side errors (the aggregator's call):
    # each segment's mean, what this rank sent and its owner's new error == the reference
    comp = build_compressor("sign1")
    sizes = [N, 333, 4096]
    segs = [[torch.randn(n, generator=torch.Generator().manual_seed(100 * i + r)) for r in range(p)]
            for i, n in enumerate(sizes)]
    errs = [new_server_error(n, comp) for n in sizes]
    ref_errs = [[torch.zeros(chunk_numel(n, p)) for _ in range(p)] for n in sizes]
    for it in range(2):  # twice, so the server errors feed back
        steps = [segment_step(it, f"p{i}") for i in range(len(sizes))]
        sent, fut, extra, nbytes = launch([s[rank] for s in segs], comp, meter, steps=steps, group2=group2,
                                          server_errors=errs)
        means = fut.wait()
        for i, (s, n) in enumerate(zip(segs, sizes)):
            torch.testing.assert_close(means[i], _ref_two_phase(s, comp, ref_errs[i], step=steps[i]))
            torch.testing.assert_close(extra.server_errors[i], ref_errs[i][rank])
            c = chunk_numel(n, p)
            padded = torch.cat([s[rank], torch.zeros(p * c - n)])
            mine = torch.cat([comp.decompress(comp.compress(padded[j * c:(j + 1) * c], step=steps[i] * (p + 1) + j))
                              for j in range(p)])[:n]
            torch.testing.assert_close(sent[i], mine)
        errs = list(extra.server_errors)  # committed
        B = sum(comp.compress(torch.zeros(chunk_numel(n, p))).nbytes for n in sizes)
        assert nbytes == p * B
        assert meter.take_step()["data"] == 2 * (p - 1) * B

    # O(n) bytes: int8 two-phase stays near half a bf16 all-reduce whatever p
    assert 2 * (p - 1) * build_compressor("int8").compress(torch.zeros(c)).nbytes <= \
        0.55 * collective_bytes("all_reduce", N, 2, p)

    # explicit two_phase of a sparse compressor works; allreduce of int8 is refused
    comp = build_compressor("topk", ratio=0.1)
    torch.testing.assert_close(aggregate(x, comp, meter, collective="two_phase"), _ref_two_phase(xs, comp))
    with pytest.raises(ValueError, match="int8"):
        aggregate(x, build_compressor("int8"), meter, collective="allreduce")

    # async form == sync form; several two-phase buckets in flight at once
    for name in ["fp16", "topk", "int8", "sign1"]:
        comp = build_compressor(name)
        sizes = [N, 333, 4096]
        bufs = [torch.randn(s, generator=torch.Generator().manual_seed(rank * 7 + s)) for s in sizes]
        errs_a = [new_server_error(s, comp) for s in sizes]
        errs_s = [None if e is None else e.clone() for e in errs_a]
        futs = [aggregate_async(b, comp, meter, group2=group2, server_error=e, step=i)
                for i, (b, e) in enumerate(zip(bufs, errs_a))]
        chained = futs[0].then(lambda f: f.value() * 2)
        got = torch.futures.wait_all(futs)
        want = [aggregate(b, comp, meter, server_error=e, step=i)
                for i, (b, e) in enumerate(zip(bufs, errs_s))]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        torch.testing.assert_close(chained.wait(), want[0] * 2)
        for a, s in zip(errs_a, errs_s):
            if a is not None:
                torch.testing.assert_close(a, s)
    meter.take_step()
    # every rank got the same answer
    out = aggregate(x, build_compressor("sign1"), meter)
    allout = [torch.empty_like(out) for _ in range(p)]
    dist.all_gather(allout, out)
    assert all(torch.equal(o, out) for o in allout)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, pytest.param(3, marks=pytest.mark.extended),
                               pytest.param(4, marks=pytest.mark.extended)])  # 3 and 4 ranks: extended tier
def test_collectives_multi_rank(p, tmp_path):
    run_ranks(_check, p, tmp_path)


def test_world_size_one_same_code_path():
    assert not dist.is_initialized()
    x = torch.randn(1000)
    meter = WireMeter()
    for name in ["none", "fp16", "randk", "topk", "int8", "sign1", "ternary"]:
        comp = build_compressor(name)
        out = aggregate(x, comp, meter, step=1)
        ref = comp.decompress(comp.compress(x, step=1)) if name not in ("int8", "sign1") else \
            _ref_two_phase([x], comp, [torch.zeros(chunk_numel(1000, 1))] if name == "sign1" else None, step=1)
        torch.testing.assert_close(out, ref.to(x.dtype))
        torch.testing.assert_close(aggregate_async(x, comp, meter, step=1).wait(), out)
    assert sum(meter.take_step().values()) == 0


def test_select_collective():
    assert select_collective(build_compressor("bf16")) == "allreduce"
    assert select_collective(build_compressor("randk")) == "allreduce"
    assert select_collective(build_compressor("ternary")) == "allgather"
    assert select_collective(build_compressor("dynamic8")) == "two_phase"
    with pytest.raises(ValueError, match="allreduce.*topk"):
        select_collective(build_compressor("topk"), "allreduce")
    with pytest.raises(ValueError, match="ring"):
        select_collective(build_compressor("topk"), "ring")
    assert aggregate(torch.ones(5), build_compressor("none"), WireMeter(), collective="allgather").eq(1).all()


class _FailedWork:
    """A collective a peer's death failed: gloo's error in the future, the output never written."""

    def __init__(self):
        self.fut = torch.futures.Future()
        self.fut.set_exception(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"))

    def get_future(self):
        return self.fut

    def is_completed(self) -> bool:
        return True


@pytest.mark.parametrize("name,collective,failing", [
    ("randk", "allreduce", 0), ("topk", "allgather", 0), ("int8", "two_phase", 0), ("int8", "two_phase", 1),
    ("chunk_topk", "two_phase", 0), ("chunk_topk", "two_phase", 1)])
def test_a_failed_collective_raises_its_own_error_not_one_of_decoding(monkeypatch, name, collective, failing):
    """Seen in the chaos drill: a peer SIGKILLed mid all-gather made Top-K's decoding of the
    unwritten buffer raise "The size of tensor a (0) must match ..." (a traceback) instead of the
    collective's error, which thinwire.train turns into its one line "a collective failed or timed
    out". Every callback reads its future's value first. ``failing``: which of the collective's
    calls (two_phase: the first or the second phase) fails."""
    import thinwire.comm.collectives as C

    calls = []

    def failing_at(fn):
        real = getattr(C, fn)

        def call(*args, **kwargs):
            calls.append(fn)
            if len(calls) - 1 != failing:
                return real(*args, **kwargs)
            work = _FailedWork()
            return work.fut if fn == "_all_to_all_v" else work  # that one returns the future
        return call

    for fn in ("all_reduce", "all_gather_into", "all_to_all_single", "_all_to_all_v"):
        monkeypatch.setattr(C, fn, failing_at(fn))
    comp = build_compressor(name, **({"chunk": 64} if name == "chunk_topk" else {}))
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errs = [new_server_error(x.numel(), comp)] if collective == "two_phase" else None
    _, fut, _, _ = launch([x], comp, WireMeter(), steps=[3], collective=collective, server_errors=errs)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        fut.wait()
    assert len(calls) == failing + 1
