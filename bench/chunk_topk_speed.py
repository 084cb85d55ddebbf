"""Speed of ``comm=chunk_topk`` (SparseLoCo's chunked Top-K + 2-bit code book) on one CPU thread.

    PYTHONPATH=. python bench/chunk_topk_speed.py [--numel 25000000] [--reps 5] [--bits 2]

Prints compress + decompress of one fp32 tensor of ``--numel`` elements (default 25M, 100 MB)
as a ratio to ``dst.copy_(src)`` of the same bytes into a buffer allocated beforehand, both
timed in this run on one thread (``torch.set_num_threads(1)``), best of ``--reps``; and the
parts: compress alone, decompress alone (it returns a fresh dense tensor, so it pays for
zeroing 100 MB of new pages, printed as ``torch.zeros``), and ``accumulate`` into an existing
buffer (what the all-gather does with every received payload). The goal is a ratio <= 20.
Not a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from thinwire.comm.compressors import build_compressor


def best(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bits", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.numel, generator=g)
    dst = torch.empty_like(x)
    c = build_compressor("chunk_topk", bits=args.bits)
    p = c.compress(x)
    acc = torch.zeros(args.numel)

    copy = best(lambda: dst.copy_(x), args.reps)
    both = best(lambda: c.decompress(c.compress(x)), args.reps)
    enc = best(lambda: c.compress(x), args.reps)
    dec = best(lambda: c.decompress(p), args.reps)
    zeros = best(lambda: torch.zeros(args.numel), args.reps)
    accum = best(lambda: c.accumulate(p, acc), args.reps)

    mb = args.numel * 4 / 1e6
    print(f"chunk_topk chunk={c.chunk} k={c.k} bits={c.bits}: {args.numel:,} fp32 ({mb:.0f} MB), 1 thread, "
          f"payload {p.nbytes:,} B ({p.nbytes / args.numel:.4f} B/param)")
    print(f"  memcpy (dst.copy_)       {copy * 1e3:8.1f} ms")
    print(f"  compress + decompress    {both * 1e3:8.1f} ms   ratio {both / copy:5.1f}x  (goal <= 20x: "
          f"{'met' if both / copy <= 20 else 'missed'})")
    print(f"  compress                 {enc * 1e3:8.1f} ms   {enc / copy:5.1f}x")
    print(f"  decompress               {dec * 1e3:8.1f} ms   {dec / copy:5.1f}x  "
          f"(of which torch.zeros of fresh memory {zeros * 1e3:.1f} ms)")
    print(f"  accumulate (into a buffer) {accum * 1e3:6.1f} ms   {accum / copy:5.1f}x")
    print(f"RATIO {both / copy:.2f}")


if __name__ == "__main__":
    main()
