"""What one collective call costs on the wire beyond its payload, on launch/netsim hosts.

Run with one rank per namespace (gloo over eth0):

    PYTHON=$(which python) launch/netsim run 4 100mbit -- bench/cluster_peer_probe.py --out probe/

Each rank reads its eth0 tx_bytes and the clock around K calls of: all_reduce, all_gather
and all_to_all of 1 fp32 element (per rank; all_to_all: per peer), of 16,384 fp32
(64 KiB) and of 262,144 fp32 (1 MiB; K/8 calls); a barrier comes before every counter read so the calls' traffic has left. Per call it writes what was
measured, the payload thinwire's accounting charges (ring formulas,
thinwire/comm/accounting.py) and their difference: the per-call overhead (Ethernet/IP/TCP
headers of every message, the receiver's ACKs, gloo's own small messages) that the
accounting leaves out by design, and the seconds per call (the closing barrier's time
subtracted): bench/netclock_validate.py fits the network clock's per-call cost from them.
Rank r writes <out>/probe<r>.json.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from thinwire.comm.accounting import collective_bytes

TX = "/sys/class/net/eth0/statistics/tx_bytes"


def tx() -> int:
    try:
        with open(TX) as fh:
            return int(fh.read())
    except OSError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    p, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    cases = {}  # name: (call, input, kind, elements, calls)
    for label, n in (("1 fp32", 1), ("64 KiB", 16384), ("1 MiB", 262144)):
        k = a.calls if n < 262144 else max(4, a.calls // 8)  # 1 MiB calls take ~1 s each at 10 Mbit/s
        cases[f"all_reduce {label}"] = (lambda t: dist.all_reduce(t), torch.zeros(n), "all_reduce", n, k)
        cases[f"all_gather {label}"] = (lambda t, n=n: gather(torch.zeros(p * n), t), torch.zeros(n), "all_gather", n, k)
        cases[f"all_to_all {label}"] = (lambda t, n=n: dist.all_to_all_single(torch.zeros(p * n), t),
                                        torch.zeros(p * n), "all_to_all", p * n, k)
    res = {}
    for name, (fn, t, kind, n, calls) in cases.items():
        fn(t)  # connections and buffers set up
        dist.barrier()
        t0, s0 = tx(), time.perf_counter()
        for _ in range(calls):
            fn(t)
        dist.barrier()
        measured, seconds = tx() - t0, time.perf_counter() - s0
        # the closing barrier is itself a small collective: measure it alone and subtract
        b0, s0 = tx(), time.perf_counter()
        dist.barrier()
        dist.barrier()
        barrier, barrier_s = (tx() - b0) / 2, (time.perf_counter() - s0) / 2
        payload = collective_bytes(kind, n, 4, p)
        per_call = (measured - barrier) / calls
        res[name] = {"calls": calls, "measured_per_call": round(per_call, 1), "payload_per_call": payload,
                     "overhead_per_call": round(per_call - payload, 1),
                     "seconds_per_call": (seconds - barrier_s) / calls}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"probe{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world_size": p, "cases": res}, fh, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
