"""Sync strategies at equal wall time: throughput and val loss of ddp, local, co2,
torch's PostLocalSGDOptimizer (same H) and, when installed, DeepSpeed ZeRO-2 with bf16
communication, 2 gloo ranks on this machine, with a
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
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def thinwire_row(overrides: list[str], steps: int, eval_every: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "thinwire.train", f"trainer.max_steps={steps}",
               f"trainer.eval_every={eval_every}", f"trainer.checkpoint_every={steps}", "trainer.sample_chars=0",
               "trainer.progress=false", "logger=none", f"hydra.run.dir={d}", *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{p.stderr[-2000:]}")
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            return summarise([json.loads(line) for line in fh])


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
    """torch.distributed.optim.PostLocalSGDOptimizer + PeriodicModelAverager, same model,
    data, AdamW and schedule, under torchrun."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "--postlocal-worker", out, str(steps), str(eval_every), str(H), *base]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise RuntimeError(f"PostLocalSGD failed:\n{p.stderr[-3000:]}")
        with open(out) as fh:
            return summarise(json.load(fh))


def postlocal_worker(out: str, steps: int, eval_every: int, H: int, overrides: list[str]) -> None:
    import time
    import warnings

    import torch
    import torch.distributed as dist
    from hydra.utils import instantiate
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (PostLocalSGDState,
                                                                                 post_localSGD_hook)
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from thinwire.comm.accounting import WireMeter, ring_allreduce_bytes
    from thinwire.optim.schedule import lr_at
    from thinwire.config import compose
    from thinwire.trainer.loop import evaluate
    from thinwire.trainer.world import init_world

    cfg = compose(overrides)
    world = init_world("gloo")
    data = instantiate(cfg.data, seed=cfg.trainer.seed, rank=world.rank, world_size=world.world_size)
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model, info=data.info)
    torch.manual_seed(cfg.trainer.seed * 1_000_003 + world.rank)
    subgroup, _ = dist.new_subgroups(group_size=1)  # every rank its own subgroup: no per-step sync
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ddp = DDP(model, broadcast_buffers=False)
    ddp.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=1),
                           post_localSGD_hook)
    o = cfg.optim
    inner = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    opt = PostLocalSGDOptimizer(optim=inner, averager=PeriodicModelAverager(period=H, warmup_steps=0))
    rows, meter = [], WireMeter()
    numel = sum(p.numel() for p in model.parameters())
    for step in range(steps):
        t0 = time.perf_counter()
        lr = lr_at(step, lr=o.lr, max_steps=steps, schedule=o.schedule, warmup_steps=o.warmup_steps,
                   min_lr_ratio=o.min_lr_ratio)
        for g in inner.param_groups:
            g["lr"] = lr
        batch = data.train_batch(step)
        opt.zero_grad()
        loss = ddp(**batch)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        dt = time.perf_counter() - t0
        n = data.info.items_per_batch * world.world_size
        synced = (step + 1) % H == 0  # the averager all-reduces the parameters (fp32, ring)
        row = {"step": step + 1, "step_time_s": dt, f"{data.info.unit}_per_s": n / dt, "comm_wait_s": 0.0,
               "wire_bytes": ring_allreduce_bytes(numel, 4, world.world_size) if synced else 0}
        if (step + 1) % eval_every == 0:
            row["val_loss"] = evaluate(model, data, world, meter)
        rows.append(row)
    if world.rank == 0:
        with open(out, "w") as fh:
            json.dump(rows, fh)
    dist.destroy_process_group()


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
    ap.add_argument("--postlocal-worker", nargs="+", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.postlocal_worker:
        out, steps, every, H, *overrides = args.postlocal_worker + rest
        return postlocal_worker(out, int(steps), int(every), int(H), overrides)
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
    with open(args.out + ".json", "w") as fh:
        json.dump({"args": vars(args), "equal_wall_s": t_equal, "results": results}, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
