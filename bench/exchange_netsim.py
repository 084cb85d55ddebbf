"""Bytes per rank of experiment=sparseloco's exchange on the shaped network (launch/netsim: one
namespace per rank, links shaped with tc tbf; needs root), all-gather vs two_phase at p = 2 and 4
(issue 34). One exchange per step (sync.local_steps=1) so that the exchange, not the per-step
control messages, dominates; setup is removed as tests/test_netsim.py does: a 32-step run minus
a 2-step run started beside it, i.e. 30 exchanges. Prints, per exchange, rank 0's accounted bytes
(wire_bytes: data + control) and the mean tx_bytes of the hosts' eth0 (frames: headers and the
ACKs of what a host receives included).

    python bench/exchange_netsim.py [--hosts 2 4] [--rate 1gbit] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETSIM = os.path.join(ROOT, "launch", "netsim")
STEPS, BASE = 32, 2


def start(tag, hosts, steps, coll, port, wd, rate):
    env = {**os.environ, "PYTHON": sys.executable, "NETSIM_PREFIX": tag, "NETSIM_PORT": str(port),
           "WANDB_MODE": "disabled"}
    run_dir, stats = os.path.join(wd, f"run{steps}"), os.path.join(wd, f"stats{steps}.json")
    cmd = ["bash", NETSIM, "run", str(hosts), rate, "--stats", stats, "--", "-m", "thinwire.train",
           "experiment=sparseloco", "sync.local_steps=1", f"comm.collective={coll}", f"trainer.max_steps={steps}",
           f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}", "logger=none",
           "dist.backend=gloo", "dist.threads=1", f"hydra.run.dir={run_dir}"]
    log = open(os.path.join(wd, f"log{steps}"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=wd, env=env), run_dir, stats


def accounted(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return sum(r["wire_bytes"] + r.get("eval_bytes", 0) for r in map(json.loads, filter(str.strip, fh)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--out", default="/tmp/exchange_netsim")
    args = ap.parse_args()
    results, k = {}, 0
    for hosts in args.hosts:
        for coll in ["allgather", "two_phase"]:
            wd = os.path.join(args.out, f"{coll}{hosts}")
            os.makedirs(wd, exist_ok=True)
            tag = f"ex{os.getpid() % 1000}{k}"
            a = start(tag + "m", hosts, STEPS, coll, 29600 + 2 * k, wd, args.rate)
            b = start(tag + "b", hosts, BASE, coll, 29601 + 2 * k, wd, args.rate)
            k += 1
            if a[0].wait() or b[0].wait():
                raise SystemExit(f"{coll} p={hosts} failed: see {wd}/log*")
            sm, sb = (json.load(open(s)) for s in (a[2], b[2]))
            tx = [h["tx_bytes"] - hb["tx_bytes"] for h, hb in zip(sm["per_host"], sb["per_host"])]
            n = STEPS - BASE
            results[f"{coll} p={hosts}"] = {"accounted_rank0_per_exchange": (accounted(a[1]) - accounted(b[1])) / n,
                                            "measured_mean_per_exchange": sum(tx) / len(tx) / n,
                                            "measured_per_host": tx}
            print(json.dumps({f"{coll} p={hosts}": results[f"{coll} p={hosts}"]}), flush=True)
    json.dump(results, open(os.path.join(args.out, "result.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
