"""Bytes per rank of one pseudo-gradient exchange, by the accounting formulas (what the meter
charges; issue 34), for the all-gather and the run-aligned two_phase of SparseLoCo's chunk_topk
and for the low-bit quantisers, against a bf16 ring all-reduce of the same model.

    PYTHONPATH=. python bench/exchange_bytes.py                # experiment=sparseloco's model
    PYTHONPATH=. python bench/exchange_bytes.py --model 7b     # LLaMA-7B's tensor shapes

Each row: bytes per rank (two_phase: the busiest rank; ownership from the parameter names, as
the aggregator assigns it) of the compressed tensors plus the fp32 all-reduce of the tensors
below the preset's comm.min_numel, and the ratio to a bf16 all-reduce of every parameter; for
the sparse rows also per inner step at H = 15 (one exchange per 15 bf16 all-reduces, the
convention of docs/quality.md; the 6-byte finiteness flag is left out).
"""
from __future__ import annotations

import argparse
import zlib

from thinwire.comm.accounting import collective_bytes
from thinwire.comm.ownership import chunk_numel, owner_ranges, two_phase_bytes
from thinwire.comm.compressors import build_compressor


def sparseloco_params() -> list[tuple[str, int]]:
    from thinwire.config import compose
    from thinwire.data.shakespeare import ShakespeareChars
    from thinwire.models.gpt import GPT, GPTShape

    cfg = compose(["experiment=sparseloco"])
    info = ShakespeareChars(batch_size=16, block_size=64).info
    opts = {k: v for k, v in cfg.model.items() if k != "_target_"}
    return [(n, p.numel()) for n, p in GPT(GPTShape(vocab_size=info.vocab_size, **opts)).named_parameters()]


def llama7b_params() -> list[tuple[str, int]]:
    d, f, v = 4096, 11008, 32000
    out = [("tok_embeddings.weight", v * d), ("output.weight", v * d), ("norm.weight", d)]
    for i in range(32):
        out += [(f"layers.{i}.attention.w{x}.weight", d * d) for x in "qkvo"]
        out += [(f"layers.{i}.feed_forward.w{x}.weight", d * f) for x in "123"]
        out += [(f"layers.{i}.{x}_norm.weight", d) for x in ("attention", "ffn")]
    return out


def quant_nbytes(name: str, n: int) -> int:
    """compress(x).nbytes of the quantisers at their defaults, for x of n elements."""
    if name == "int8":
        return n + 4 * -(-n // 2048)
    return build_compressor(name).payload_nbytes(n)


def exchange_bytes(params, method: str, p: int) -> int:
    dense_thr = 4096 if method.startswith("sparseloco") else 1024
    big = [(nm, n) for nm, n in params if n >= dense_thr]
    dense = collective_bytes("all_reduce", sum(n for _, n in params if n < dense_thr), 4, p)
    if method == "sparseloco allgather":
        c = build_compressor("chunk_topk")
        return (p - 1) * sum(c.payload_nbytes(n) for _, n in big) + dense
    if method == "sparseloco two_phase":
        c = build_compressor("chunk_topk")
        offsets = [zlib.crc32(nm.encode()) & 0xFFFFF for nm, _ in big]   # ownership.owner_offset
        return two_phase_bytes([n for _, n in big], c, p, None, offsets) + dense
    q = method.split()[0]
    return sum(2 * (p - 1) * quant_nbytes(q, chunk_numel(n, p)) for _, n in big) + dense


METHODS = ["sparseloco allgather", "sparseloco two_phase", "int8 two_phase", "fp8 two_phase", "int4 two_phase"]


def table(params, ps=(2, 4, 8, 64), h=15) -> str:
    total = sum(n for _, n in params)
    lines = [f"{len(params)} tensors, {total:,} parameters",
             "| exchange | " + " | ".join(f"p = {p}: B/rank, ratio to bf16" for p in ps) + " |",
             "|---|" + "---|" * len(ps)]
    for m in METHODS:
        cells = []
        for p in ps:
            b, bf16 = exchange_bytes(params, m, p), collective_bytes("all_reduce", total, 2, p)
            cell = f"{b:,} (1/{bf16 / b:.1f}"
            if m.startswith("sparseloco"):
                cell += f"; per step at H={h}: 1/{h * bf16 / b:.0f}"
            cells.append(cell + ")")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ownership(params, p: int = 4) -> str:
    """Where the two_phase bytes of SparseLoCo at ``p`` go, against the all-gather's: ownership by
    the names' hash (what the aggregator does), the best a balanced ownership could do (each
    tensor's first block given, largest tensors first, to the owner that then holds the fewest
    bytes; ``two_phase_bytes`` of those offsets), and the floor 2 (p - 1) / p of one whole
    payload (one code book per tensor, not per owner range; perfect balance)."""
    c = build_compressor("chunk_topk")
    big = [(nm, n) for nm, n in params if n >= 4096]
    dense = collective_bytes("all_reduce", sum(n for _, n in params if n < 4096), 4, p)
    ag = exchange_bytes(params, "sparseloco allgather", p)
    hashed = exchange_bytes(params, "sparseloco two_phase", p)
    offsets, held = [0] * len(big), [0] * p
    for i in sorted(range(len(big)), key=lambda i: -big[i][1]):
        def held_with(o):
            return [h + sum(c.payload_nbytes(b - a) for j2, (a, b) in enumerate(owner_ranges(big[i][1], 4096, p, o))
                            if j2 == j and b > a) for j, h in enumerate(held)]
        offsets[i] = min(range(p), key=lambda o: max(held_with(o)))
        held = held_with(offsets[i])
    balanced = two_phase_bytes([n for _, n in big], c, p, None, offsets) + dense
    floor = 2 * (p - 1) / p * sum(c.payload_nbytes(n) for _, n in big) + dense
    return (f"p = {p}, two_phase / all-gather ({ag:,} B): hashed ownership {hashed:,} B ({hashed / ag:.3f}); "
            f"balanced ownership {balanced:,} B ({balanced / ag:.3f}); floor, one code book per tensor "
            f"{floor:,.0f} B ({floor / ag:.3f}); the fp32 all-reduce of the small tensors, {dense:,} B, in all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["sparseloco", "7b"], default="sparseloco")
    ap.add_argument("--p", type=int, nargs="+", default=[2, 4, 8, 64])
    args = ap.parse_args()
    params = sparseloco_params() if args.model == "sparseloco" else llama7b_params()
    print(table(params, tuple(args.p)))
    print(ownership(params))


if __name__ == "__main__":
    main()
