"""Wall time of the config refusals of issue 36 (item 4): each command ``-n`` times (warm
cache after the first: the OS's, and thinwire's snapshot of the schemas, thinwire.config.fast),
median per command, and ``python -c "import torch"`` for scale.

    python tools/config_error_times.py -n 5
    python tools/config_error_times.py -n 5 --before ../before   # and a checkout of other code, interleaved

With ``--before DIR`` every command also runs with DIR's thinwire (first on ``PYTHONPATH``),
alternating with this checkout's run by run, so both see the same load; the ratio is
before / after per command.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSED = ("comm=nosuch", "trainer.max_steps=-5", "optim.lr=inf", "model.block_size=100000000")


def wall(cmd: list[str], code: str = REPO) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys: what a loaded machine does not stretch) and the exit code."""
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": code + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)  # python -m puts cwd first
    t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return t, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--before", default=None, help="a checkout whose thinwire to time too, interleaved")
    args = ap.parse_args()
    codes = {"after": REPO, **({"before": os.path.abspath(args.before)} if args.before else {})}
    for code in codes.values():  # warm the caches (and leave this code's snapshot of the schemas)
        wall([sys.executable, "-m", "thinwire.train", REFUSED[0]], code)
    rows = [("import torch", [sys.executable, "-c", "import torch"])]
    rows += [(f"thinwire-train {a}", [sys.executable, "-m", "thinwire.train", a]) for a in REFUSED]
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for name, cmd in rows:
        which = {"after": REPO} if cmd[1] == "-c" else codes  # import torch: the same for any thinwire
        times, cpus, rcs = {k: [] for k in which}, {k: [] for k in which}, {}
        for _ in range(args.n):
            for k, code in which.items():
                t, c, rcs[k] = wall(cmd, code)
                times[k].append(t)
                cpus[k].append(c)
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        line = "  ".join(f"{k}: wall median {med[k]:6.2f} s (min {min(times[k]):.2f}, max {max(times[k]):.2f}), "
                         f"CPU median {cpu[k]:5.2f} s, exit {rcs[k]}" for k in which)
        if "before" in med:
            line += f"  before/after: wall {med['before'] / med['after']:.2f}x, CPU {cpu['before'] / cpu['after']:.2f}x"
        print(f"{name:40s} {line}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
