"""Sync strategies at equal wall time: throughput and val loss of ddp, local, co2,
torch's PostLocalSGDOptimizer (same H; harness/peers.py's, as in the cluster matrix) and, when
installed, DeepSpeed ZeRO-2 with bf16 communication, 2 gloo ranks on this machine, with a
compute-only row (local updates that never synchronise) measured in the same run as the
reference for "communication hidden".

    python bench/sync.py                      # default demo model, 600 steps per row
    python bench/sync.py --steps 200 --quick  # tiny model

Writes bench/results/sync.{json,md}. The loopback link here is fast, so this measures
what synchronisation costs in compute and CPU contention; bench/cluster.py shapes links.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

from harness import manifest, runs

HERE = os.path.dirname(os.path.abspath(__file__))


def thinwire_row(overrides: list[str], steps: int, eval_every: int, cmd: list[str] | None = None) -> dict:
    """One row (``cmd``: torch's peer, else ``thinwire-train``), summarised."""
    with tempfile.TemporaryDirectory() as d:
        return summarise(runs.train([f"trainer.max_steps={steps}", f"trainer.eval_every={eval_every}",
                                     f"trainer.checkpoint_every={steps}", "trainer.sample_chars=0",
                                     "trainer.progress=false", "logger=none", *overrides], d, cmd))


def summarise(rows: list[dict]) -> dict:
    """Cumulative wall time per step; throughput over the steady state (steps after the
    first 10% are counted, so start-up and the first bucket rebuild do not dominate)."""
    t, curve = 0.0, []
    for r in rows:
        t += r["step_time_s"]
        if "val_loss" in r:
            curve.append((r["step"], t, r["val_loss"]))
    skip = max(1, len(rows) // 10)
    steady = rows[skip:]
    unit = next(k for k in rows[0] if k.endswith("_per_s"))
    per_step_items = rows[0][unit] * rows[0]["step_time_s"]
    rate = per_step_items * len(steady) / sum(r["step_time_s"] for r in steady)
    wait = sum(r.get("comm_wait_s", 0.0) for r in steady) / len(steady)
    return {"curve": curve, "throughput": rate, "unit": unit, "comm_wait_s": wait,
            "wire_bytes_per_step": sum(r["wire_bytes"] for r in steady) / len(steady),
            "final_val_loss": curve[-1][2], "wall_s": t}


def postlocal_row(base: list[str], steps: int, eval_every: int, H: int) -> dict:
    """torch's PostLocalSGDOptimizer + PeriodicModelAverager and post_localSGD_hook (torch's recipe:
    H-1 plain DDP steps, then an average every H steps) around thinwire's AdamW: the same peer as
    the cluster matrix and the time-to-target protocol (harness/cluster_peer.py), 2 ranks."""
    return thinwire_row([*base, f"trainer.drift_check_every={H}"], steps, eval_every,
                        runs.peer_cmd(["--peer=postlocal", f"--H={H}"], 2))


def at_wall_time(curve: list, t: float) -> float | None:
    """Val loss of the last evaluation finished within wall time t."""
    done = [v for _, w, v in curve if w <= t + 1e-9]
    return done[-1] if done else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="tiny model")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sync"))
    args = ap.parse_args()
    base = ["experiment=tiny"] if args.quick else []
    every = max(1, args.steps // 6)
    H = f"sync.local_steps={args.H}"
    configs = {
        "ddp": [*base, "sync=ddp"],
        "local": [*base, "sync=local", H],
        "co2": [*base, "sync=co2", H],
        "compute-only": [*base, "sync=local", f"sync.local_steps={10 ** 9}"],
    }
    if importlib.util.find_spec("deepspeed") is not None:  # peer row: ZeRO-2, bf16 gradients on the wire
        configs["deepspeed zero2 bf16"] = [*base, "engine=deepspeed",
                                           "engine.deepspeed.communication_data_type=bf16"]
    results = {}
    for name, ov in configs.items():
        results[name] = thinwire_row(ov, args.steps, every)
        print(f"{name:14s} {results[name]['throughput']:9.0f} {results[name]['unit']}  "
              f"val {results[name]['final_val_loss']:.4f}", flush=True)
    results["torch PostLocalSGD"] = postlocal_row(base, args.steps, every, args.H)
    print(f"torch PostLocalSGD {results['torch PostLocalSGD']['throughput']:9.0f}", flush=True)
    t_equal = min(r["wall_s"] for r in results.values())
    compute = results["compute-only"]["throughput"]
    lines = [f"2 gloo ranks, {'tiny' if args.quick else 'demo'} char-GPT, {args.steps} steps, H={args.H}; "
             f"equal wall time = {t_equal:.1f} s (the fastest row's total)", "",
             "| row | throughput | vs compute-only | comm wait/step (ms) | wire MB/step | val loss (end) "
             "| val loss @ equal wall time |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        v = at_wall_time(r["curve"], t_equal)
        lines.append(f"| {name} | {r['throughput']:.0f} {r['unit'].removesuffix('_per_s')}/s | "
                     f"{r['throughput'] / compute:.2f}x | {1e3 * r['comm_wait_s']:.2f} | "
                     f"{r['wire_bytes_per_step'] / 1e6:.3f} | {r['final_val_loss']:.4f} | "
                     f"{'-' if v is None else f'{v:.4f}'} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    manifest.write(args.out + ".json", {"args": vars(args), "equal_wall_s": t_equal, "results": results},
                   "bench/sync.py")
    manifest.write(args.out + ".md", table + "\n", "bench/sync.py")


if __name__ == "__main__":
    sys.exit(main())
