"""Wall time of the config refusals of issue 36 (item 4): each command ``-n`` times (warm
cache after the first), median per command, and ``python -c "import torch"`` for scale.

    python tools/config_error_times.py -n 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REFUSED = ("comm=nosuch", "trainer.max_steps=-5", "optim.lr=inf", "model.block_size=100000000")


def wall(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    return time.perf_counter() - t0, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    wall([sys.executable, "-m", "thinwire.train", REFUSED[0]])  # warm the caches
    rows = [("import torch", [sys.executable, "-c", "import torch"])]
    rows += [(f"thinwire-train {a}", [sys.executable, "-m", "thinwire.train", a]) for a in REFUSED]
    for name, cmd in rows:
        times = []
        for _ in range(args.n):
            t, rc = wall(cmd)
            times.append(t)
        print(f"{name:45s} median {statistics.median(times):6.2f} s  (min {min(times):.2f}, max {max(times):.2f}, "
              f"exit {rc})", flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
