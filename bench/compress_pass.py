"""The compress pass against a copy of the same bytes: eager, compiled codec, fused.

    PYTHONPATH=. python bench/compress_pass.py [--device cpu|cuda] [--sizes 1M,16M,64M,256M] \
        [--reps 10] [--json out.json]

A pass is what a rank does to one fp32 gradient of n elements with error feedback (EF,
``comm.feedback=ef``): q = g + e, compress q, decode the payload (the local C(q) that EF
needs, and what a receiver does with a peer's payload), e <- q - C(q). Timed per size, in the
same run, against ``dst.copy_(src)`` of the n fp32 values (the device's copy: 8n bytes moved,
read + write), best of ``--reps`` (CUDA events on the GPU, after a warm-up):

- ``eager``: the library's default path (``ClassicEF`` + ``Int8Compressor`` / ``Sign1Compressor``
  / ``ChunkTopKCompressor``: separate kernels);
- ``compiled``: the same with the codec compiled (``comm.compile=true``: ``fused.compiled``'s
  encode/decode) and EF's two elementwise ops eager;
- ``fused``: EF + encode in one compiled function, then the compiled decode of the payload
  (``fused.ef_pass``);
- ``triton`` (CUDA): the same in ``fused_triton``'s hand-written kernels, what
  ``comm.compile=true`` runs on CUDA; the floor this design can reach: 13 B/element in and out for int8
  (read g, e; write e, codes) + 5 for the decode = 18 B, 2.25x a copy's 8; sign 16.25 B, 2.03x.

Prints a Markdown table per size, the copy bandwidth (GB/s counting read + write) and each
pass's effective bandwidth as a fraction of it (the "pass efficiency" the network clock of
``bench/harness/netclock_project.py`` uses for codec time). Goals (issue "prove the NCCL paths"): int8 / sign
pass <= 2x a device copy on the GPU; chunked Top-K within 3x of int8; on one CPU thread,
compiled int8 / sign <= 4x memcpy. Not a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from harness import manifest
from thinwire.comm.compressors import build_compressor, fused
from thinwire.comm.feedback import build_feedback

BLOCK = 2048
FLOOR_BYTES = {"int8": 18.0, "sign1": 16.25}  # bytes per element a fused pass must move (module doc)


def timer(device: str, reps: int):
    def best(fn) -> float:
        fn()
        fn()  # warm-up (and compilation)
        ts = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return min(ts)
    return best


def eager_pass(name: str, g: torch.Tensor, kw: dict):
    comp, fb = build_compressor(name, **kw), build_feedback("ef")
    fb.store["w"] = {"e": torch.zeros_like(g)}

    def run():
        q = fb.message("w", g)
        local = comp.decompress(comp.compress(q, step=1))
        return fb.result("w", g, q, local, local)
    return run


def compiled_pass(name: str, g: torch.Tensor, e: torch.Tensor):
    encode, decode, _ = fused.compiled(name)

    def run():
        q = g + e
        codes, s = encode(q, BLOCK)
        return q - decode(codes, s, BLOCK)
    return run


def fused_pass(name: str, g: torch.Tensor, e: torch.Tensor):
    _, decode, ef = fused.compiled(name)

    def run():
        codes, s, e_new = ef(g, e, BLOCK)
        return decode(codes, s, BLOCK), e_new
    return run


def triton_pass(name: str, g: torch.Tensor, e: torch.Tensor):
    from thinwire.comm.compressors import fused_triton

    def run():
        codes, s, e_new = fused_triton.ef_pass(name, g, e, BLOCK)
        return fused_triton.decode(name, codes, s, BLOCK), e_new
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default="1M,16M")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU goal is one thread)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    best = timer(args.device, args.reps)
    sizes = [int(s[:-1]) << 20 if s.endswith("M") else int(s) for s in args.sizes.split(",")]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}\n")
    rows = []
    for n in sizes:
        gen = torch.Generator(device=args.device).manual_seed(0)
        g = torch.randn(n, device=args.device, generator=gen)
        e = torch.randn(n, device=args.device, generator=gen).mul_(0.01)
        dst = torch.empty_like(g)
        t_copy = best(lambda: dst.copy_(g))
        bw = 8 * n / t_copy
        print(f"### n = {n:,} fp32: copy {t_copy * 1e3:.3f} ms, {bw / 1e9:.0f} GB/s (read + write)\n")
        print("| compressor | path | time / copy | pass efficiency |")
        print("|---|---|---:|---:|")
        cases = [("int8", "eager", eager_pass("int8", g, {})), ("int8", "compiled", compiled_pass("int8", g, e)),
                 ("int8", "fused", fused_pass("int8", g, e)),
                 ("sign1", "eager", eager_pass("sign1", g, {})), ("sign1", "compiled", compiled_pass("sign1", g, e)),
                 ("sign1", "fused", fused_pass("sign1", g, e)),
                 ("chunk_topk", "eager", eager_pass("chunk_topk", g, {}))]
        if args.device == "cuda":  # comm.compile's kernels on CUDA
            cases[3:3] = [("int8", "triton", triton_pass("int8", g, e))]
            cases.insert(-1, ("sign1", "triton", triton_pass("sign1", g, e)))
        for name, path, fn in cases:
            t = best(fn)
            floor = FLOOR_BYTES.get(name)
            eff = (floor * n / t) / bw if floor else float("nan")  # the floor's bytes at this speed, vs copy
            rows.append({"n": n, "compressor": name, "path": path, "ratio": t / t_copy, "seconds": t,
                         "copy_seconds": t_copy, "copy_GBps": bw / 1e9, "efficiency": eff,
                         "device": where, "torch": torch.__version__})
            print(f"| {name} | {path} | {t / t_copy:.2f}x | {eff:.2f} |" if floor else
                  f"| {name} | {path} | {t / t_copy:.2f}x | - |")
        print()
    goal = 2.0 if args.device == "cuda" else 4.0
    print(f"### Goals ({where})\n")
    for name in ("int8", "sign1"):
        path = "triton" if args.device == "cuda" else "fused"
        worst = max(r["ratio"] for r in rows if r["compressor"] == name and r["path"] == path)
        print(f"- {name} {path} pass <= {goal:g}x copy at every size: {'MET' if worst <= goal else 'MISSED'} "
              f"(worst {worst:.2f}x; floor {FLOOR_BYTES[name] / 8:.2f}x)")
    big = max(sizes)
    topk = next(r["ratio"] for r in rows if r["n"] == big and r["compressor"] == "chunk_topk")
    int8 = min(r["ratio"] for r in rows if r["n"] == big and r["compressor"] == "int8")
    print(f"- chunk_topk pass within 3x of int8's at n = {big:,}: {'MET' if topk <= 3 * int8 else 'MISSED'} "
          f"({topk / int8:.1f}x)")
    if args.json:
        manifest.write(args.json, rows, "bench/compress_pass.py")


if __name__ == "__main__":
    main()
