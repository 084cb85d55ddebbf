"""Compressor benchmark: speed against a memcpy and wire bytes against bf16/fp32 all-reduce.

    PYTHONPATH=. python bench/compressors.py [--sizes 1M,16M] [--ranks 4] [--reps 3]

For each compressor and tensor size prints (Markdown):
  * compress+decompress wall time / the time of ``dst.copy_(src)`` of the same fp32
    bytes, measured in the same run (best of ``--reps``);
  * wire bytes per rank per step for a ``--ranks`` job under the collective the
    compressor would use (``collectives.select_collective``), from
    ``accounting.collective_bytes`` and ``payload.nbytes``:
    all-reduce (summable), (p-1) * nbytes all-gather (sparse), or all-to-all of p
    compressed chunks + all-gather of one (two-phase); as a ratio to a bf16 and an
    fp32 ring all-reduce of the same tensor;
  * approximate vs exact top-k speed at the largest size;
and whether each target of the brief is met.  Not a test; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch

from thinwire.comm.accounting import collective_bytes
from thinwire.comm.collectives import chunk_numel, select_collective
from thinwire.comm.compressors import build_compressor

CONFIGS = [
    ("none", {}), ("fp16", {}), ("bf16", {}),
    ("topk", {"ratio": 0.01}), ("topk", {"ratio": 0.01, "approximate": True}),
    ("topk", {"ratio": 0.01, "approximate": True, "index_coding": "offset16"}),
    ("randk", {"ratio": 0.01}), ("int8", {}), ("int8", {"stochastic": True}),
    ("dynamic8", {}), ("sign1", {}), ("ternary", {"ratio": 0.01}),
]


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)  # least disturbed by other processes on the machine


def wire_bytes(comp, x: torch.Tensor, p: int) -> int:
    kind = select_collective(comp)
    if kind == "allreduce":
        pl = comp.compress(x, step=0)
        return sum(collective_bytes("all_reduce", t.numel(), t.element_size(), p)
                   for t in pl.tensors.values())
    if kind == "allgather":
        return collective_bytes("all_gather", comp.compress(x, step=0).nbytes, 1, p)
    c = chunk_numel(x.numel(), p)
    b = comp.compress(x.new_zeros(c), step=0).nbytes
    return collective_bytes("all_to_all", p * b, 1, p) + collective_bytes("all_gather", b, 1, p)


def label(name: str, kw: dict) -> str:
    return name + ("" if not kw else " " + ",".join(f"{k}={v}" for k, v in kw.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1M,16M")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s[:-1]) << 20 if s.endswith("M") else int(s) for s in args.sizes.split(",")]
    p = args.ranks
    torch.manual_seed(0)
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {p} ranks\n")
    for n in sizes:
        x = torch.randn(n)
        dst = torch.empty_like(x)
        t_copy = _median_time(lambda: dst.copy_(x), max(5, args.reps))
        bf16 = collective_bytes("all_reduce", n, 2, p)
        fp32 = collective_bytes("all_reduce", n, 4, p)
        print(f"### n = {n:,} (memcpy {t_copy * 1e3:.2f} ms)\n")
        print("| compressor | collective | time / memcpy | wire B/rank | / bf16 | / fp32 |")
        print("|---|---|---:|---:|---:|---:|")
        for name, kw in CONFIGS:
            comp = build_compressor(name, **kw)
            t = _median_time(lambda: comp.decompress(comp.compress(x, step=1)), args.reps)
            wb = wire_bytes(comp, x, p)
            results[(label(name, kw), n)] = (t / t_copy, wb / bf16, t)
            print(f"| {label(name, kw)} | {select_collective(comp)} | {t / t_copy:.1f}x | "
                  f"{wb:,} | 1/{bf16 / wb:.1f} ({wb / bf16:.3f}) | {wb / fp32:.3f} |")
        print()

    big = max(sizes)
    x = torch.randn(big)
    exact = build_compressor("topk", ratio=0.01)
    approx = build_compressor("topk", ratio=0.01, approximate=True)
    ex = _median_time(lambda: exact.compress(x, step=1), args.reps)
    ap_ = _median_time(lambda: approx.compress(x, step=1), args.reps)
    print(f"top-k 1% selection (compress) at n = {big:,}: exact {ex / t_copy:.1f}x memcpy, "
          f"approximate {ap_ / t_copy:.1f}x memcpy: speed-up {ex / ap_:.1f}x\n")

    def mark(ok):
        return "MET" if ok else "MISSED"
    print("### Targets (4 ranks; time at every size)\n")
    checks = [
        ("topk 1% wire <= 1/16 bf16", results[("topk ratio=0.01", big)][1] <= 1 / 16,
         f"{results[('topk ratio=0.01', big)][1]:.4f}"),
        ("topk 1% + offset16 wire <= 1/25 bf16",
         results[("topk ratio=0.01,approximate=True,index_coding=offset16", big)][1] <= 1 / 25,
         f"{results[('topk ratio=0.01,approximate=True,index_coding=offset16', big)][1]:.5f}"
         f" (1/25 = 0.04000)"),
        ("int8 two-phase wire <= 0.55 bf16", results[("int8", big)][1] <= 0.55,
         f"{results[('int8', big)][1]:.4f}"),
        ("sign1 wire <= 1/12 bf16", results[("sign1", big)][1] <= 1 / 12,
         f"{results[('sign1', big)][1]:.4f}"),
        ("approximate top-k >= 3x faster than exact", ex / ap_ >= 3, f"{ex / ap_:.1f}x"),
    ]
    for key in ["int8", "sign1", "randk ratio=0.01"]:
        worst = max(results[(key, n)][0] for n in sizes)
        checks.append((f"{key} compress+decompress <= 4x memcpy", worst <= 4, f"worst {worst:.1f}x"))
    print("| target | result | value |\n|---|---|---|")
    for what, ok, val in checks:
        print(f"| {what} | {mark(ok)} | {val} |")


if __name__ == "__main__":
    main()
