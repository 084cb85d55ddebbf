"""thinwire against dense DDP on a bandwidth-shaped cluster simulated on one machine.

Every row runs the trainer with one rank per network namespace (launch/netsim: a bridge,
tc tbf on both ends of every link, torchrun with c10d rendezvous) and reports

  * time to target: cumulative training step time (evaluations and start-up excluded)
    at the first evaluation whose val loss is <= the target, the val loss DDP fp32
    reaches at the end of its run (measured in the same invocation);
  * throughput (tokens/s over all ranks, steady state: steps after the first 10%);
  * val loss at the end (every row runs the same number of steps with the same schedule);
  * accounted wire bytes per step (rank 0's ``wire_bytes``, data + control) and measured
    tx bytes per step per host, from the hosts' eth0 tx_bytes counters. Start-up traffic
    (rendezvous, connection set-up, DDP's initial broadcast) is removed by a baseline run
    of the same row with few steps: measured/step = (tx(run) - tx(baseline)) /
    (hosts * (steps - baseline steps)), and the same difference of accounted bytes.
    The baseline has a multiple of every row's local_steps so sync rounds cancel.

    sudo python bench/cluster.py --quick          # 4 rows at 100 Mbit/s, 2 ranks, 200 steps, < 10 min
    sudo python bench/cluster.py --rates 100mbit,1gbit --ranks 4 --steps 300

Needs root and network namespaces (launch/netsim check); exits 0 with a message otherwise.
Writes bench/results/cluster.{json,md} (--out to change the stem).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NETSIM = os.path.join(ROOT, "launch", "netsim")

# (label, overrides, local_steps or 1)
QUICK_ROWS = [
    ("ddp fp32", ["comm=none", "sync=ddp"], 1),
    ("comm=bf16", ["comm=bf16", "sync=ddp"], 1),
    ("topk 1% + ef", ["comm=topk", "comm.ratio=0.01", "comm.feedback=ef", "sync=ddp"], 1),
    ("co2 H=8", ["comm=none", "sync=co2", "sync.local_steps=8"], 8),
]
FULL_EXTRA_ROWS = [
    ("topk 1% + ef21", ["comm=topk", "comm.ratio=0.01", "comm.feedback=ef21", "sync=ddp"], 1),
    ("topk 1% + econtrol", ["comm=topk", "comm.ratio=0.01", "comm.feedback=econtrol", "sync=ddp"], 1),
    ("int8 two-phase", ["comm=int8", "sync=ddp"], 1),
    ("sign1 + ef", ["comm=sign1", "sync=ddp"], 1),
    ("co2 H=8 + int8", ["comm=int8", "sync=co2", "sync.local_steps=8"], 8),
]
BASE_STEPS = 8
# --quick: a small per-rank batch (8 sequences of 32 characters) on the default char-GPT
# (4 layers, d=128, 0.8 M params), so that on this 2-core machine one step's compute is
# well below one dense fp32 all-reduce at 100 Mbit/s (the regime the benchmark is about).
QUICK_MODEL = ["data.batch_size=8", "model.block_size=32"]


def netsim_run(hosts: int, rate: str, overrides: list[str], steps: int, eval_every: int, workdir: str,
               tag: str, threads: int) -> dict:
    run_dir = os.path.join(workdir, f"{tag}-{steps}")
    stats = os.path.join(workdir, f"{tag}-{steps}.json")
    env = {**os.environ, "PYTHON": sys.executable, "NETSIM_PREFIX": "twc", "WANDB_MODE": "disabled"}
    cmd = ["bash", NETSIM, "run", str(hosts), rate, "--stats", stats, "--",
           "-m", "thinwire.train", f"trainer.max_steps={steps}", f"trainer.eval_every={eval_every}",
           f"trainer.checkpoint_every={steps}", "trainer.sample_chars=0", "trainer.progress=false",
           "logger=none", "dist.backend=gloo", f"dist.threads={threads}", f"hydra.run.dir={run_dir}", *overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} ({steps} steps) failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    with open(stats) as fh:
        net = json.load(fh)
    return {"rows": rows, "net": net, "wall_s": time.perf_counter() - t0}


def summarise(label: str, overrides: list[str], main: dict, base: dict, steps: int, hosts: int) -> dict:
    rows = main["rows"]
    t, curve = 0.0, []
    for r in rows:
        t += r["step_time_s"]
        if "val_loss" in r:
            curve.append({"step": r["step"], "train_s": round(t, 3), "val_loss": r["val_loss"],
                          "wire_bytes_cum": None})
    cum = 0
    for r in rows:
        cum += r["wire_bytes"]
        for c in curve:
            if c["step"] == r["step"]:
                c["wire_bytes_cum"] = cum
    steady = rows[max(1, len(rows) // 10):]
    unit = next(k for k in rows[0] if k.endswith("_per_s"))
    items = sum(r[unit] * r["step_time_s"] for r in steady)
    acc_main = sum(r["wire_bytes"] for r in rows)
    acc_base = sum(r["wire_bytes"] for r in base["rows"])
    dsteps = steps - len(base["rows"])
    meas_main, meas_base = main["net"]["total_tx_bytes"], base["net"]["total_tx_bytes"]
    accounted = (acc_main - acc_base) / dsteps
    measured = (meas_main - meas_base) / (hosts * dsteps)
    return {
        "label": label, "overrides": overrides, "steps": steps,
        "train_s": round(t, 3), "run_wall_s": round(main["wall_s"], 1),
        f"{unit}": round(items / sum(r["step_time_s"] for r in steady), 1),
        "s_per_step": round(sum(r["step_time_s"] for r in steady) / len(steady), 4),
        "comm_wait_s_per_step": round(sum(r.get("comm_wait_s", 0.0) for r in steady) / len(steady), 4),
        "final_val_loss": curve[-1]["val_loss"], "curve": curve,
        "accounted_bytes_per_step": round(accounted), "measured_bytes_per_step": round(measured),
        "measured_over_accounted": round(measured / accounted, 4) if accounted else None,
        "dense_bytes_per_step": rows[-1]["dense_bytes"],
        "setup_tx_bytes": meas_main - hosts * acc_main,
        "per_host_tx_bytes": [h["tx_bytes"] for h in main["net"]["per_host"]],
    }


def time_to(curve: list[dict], target: float) -> tuple[float | None, int | None]:
    for c in curve:
        if c["val_loss"] <= target:
            return c["train_s"], c["step"]
    return None, None


def markdown(res: dict) -> str:
    out = [f"Rate {res['rate']}, {res['hosts']} ranks (one per namespace), {res['steps']} steps per row, "
           f"eval every {res['eval_every']}; target val loss {res['target']:.4f} (DDP fp32 at step {res['steps']}).",
           "",
           "| row | time to target (s) | speed-up vs ddp fp32 | tokens/s | s/step (comm wait) | val loss @ end | "
           "accounted B/step | measured B/step | measured/accounted |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense_t = res["rows"][0]["time_to_target_s"]
    for r in res["rows"]:
        tt = r["time_to_target_s"]
        tt_s = f"{tt:.1f} (step {r['step_to_target']})" if tt is not None else f"not reached in {r['steps']} steps"
        sp = f"{dense_t / tt:.2f}x" if (tt and dense_t) else "-"
        unit = next(k for k in r if k.endswith("_per_s"))
        out.append(f"| {r['label']} | {tt_s} | {sp} | {r[unit]:.0f} | {r['s_per_step']:.3f} ({r['comm_wait_s_per_step']:.3f}) | {r['final_val_loss']:.4f} | "
                   f"{r['accounted_bytes_per_step']:,} | {r['measured_bytes_per_step']:,} | "
                   f"{r['measured_over_accounted']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 rows, one rate, 2 ranks (< 10 minutes)")
    ap.add_argument("--rates", default="100mbit", help="comma-separated tbf rates")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps per row (default 160 quick, 400 full)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--model", nargs="*", default=None,
                    help=f"extra overrides for every row (default with --quick: {' '.join(QUICK_MODEL)})")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cluster"))
    a = ap.parse_args()

    chk = subprocess.run(["bash", NETSIM, "check"], capture_output=True, text=True)
    if chk.stdout.strip() != "ok":
        print(f"bench/cluster.py: launch/netsim {chk.stdout.strip() or chk.stderr.strip()}; nothing measured")
        return 0
    steps = a.steps or (200 if a.quick else 400)
    if a.model is None:
        a.model = QUICK_MODEL if a.quick else []
    if steps % BASE_STEPS:
        ap.error(f"--steps must be a multiple of {BASE_STEPS}")
    rows_def = QUICK_ROWS if a.quick else QUICK_ROWS + FULL_EXTRA_ROWS
    rates = a.rates.split(",")
    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twcluster") as work:
        for rate in rates:
            rows = []
            for i, (label, ov, _h) in enumerate(rows_def):
                ov = [*ov, *a.model]
                tag = f"r{i}-{rate}"
                main_run = netsim_run(a.ranks, rate, ov, steps, a.eval_every, work, tag, a.threads)
                base_run = netsim_run(a.ranks, rate, ov, BASE_STEPS, BASE_STEPS, work, tag, a.threads)
                row = summarise(label, ov, main_run, base_run, steps, a.ranks)
                rows.append(row)
                print(f"[{rate}] {label}: {row['s_per_step']:.3f} s/step, val {row['final_val_loss']:.4f}, "
                      f"accounted {row['accounted_bytes_per_step']:,} B/step, measured "
                      f"{row['measured_bytes_per_step']:,} B/step ({time.perf_counter() - t_start:.0f} s so far)",
                      flush=True)
            target = rows[0]["final_val_loss"]
            for r in rows:
                r["time_to_target_s"], r["step_to_target"] = time_to(r["curve"], target)
            results.append({"rate": rate, "hosts": a.ranks, "steps": steps, "eval_every": a.eval_every,
                            "target": target, "rows": rows})
    doc = {"command": " ".join(["python", "bench/cluster.py", *sys.argv[1:]]), "overrides_all_rows": a.model,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads/rank {a.threads}",
           "total_s": round(time.perf_counter() - t_start, 1), "results": results}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    md = [f"`{doc['command']}` ({doc['date']}, {doc['machine']}, {doc['total_s']:.0f} s)", "",
          f"Overrides on every row: `{' '.join(a.model) or '(none)'}`.", ""]
    for res in results:
        md += [markdown(res)]
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
