"""Launch a user-style script many times at 2 ranks under torchrun and count the launches
that end abnormally (issue 36: "terminate called without an active exception", SIGABRT at
interpreter exit). Outside CI: each launch is a few seconds.

    python tools/exit_abort_drill.py -n 100                      # tools/exit_abort_user.py
    python tools/exit_abort_drill.py -n 20 --example ddp_hook    # a docs/examples/library/ one
    python tools/exit_abort_drill.py -n 20 --example all         # each example, -n launches each
    python tools/exit_abort_drill.py -n 50 --thinwire-from /work/main   # another checkout's thinwire (before a fix)
    python tools/exit_abort_drill.py -n 50 --direct              # 2 rank processes without torchrun's agent

Prints one line per failed launch and a summary (launches, exits 0, aborts, other failures).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLES = ("plain_loop", "ddp_hook", "local_sgd", "accelerate_loop", "mezo", "lora_ga", "lightning_fit")


def free_port() -> int:
    """A port no other process listens on (a fixed range collides with other users' runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_args: list[str], port: int, timeout_s: float, thinwire_from: str = REPO,
           direct: bool = False) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": thinwire_from + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if direct:  # the two ranks as torchrun would start them, without its agent process
        procs = [subprocess.Popen([sys.executable, *script_args], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)}) for r in (0, 1)]
        outs, rcs = [], []
        for r, p in enumerate(procs):
            try:
                outs.append(f"[rank {r}] " + p.communicate(timeout=timeout_s)[0][-2000:])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(f"[rank {r}] timed out")
            rcs.append(p.returncode if p.returncode is not None else -999)
        return next((rc for rc in rcs if rc != 0), 0), "\n".join(outs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), *script_args]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        return -999, (e.stderr or b"")[-2000:].decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)[-2000:]
    return p.returncode, p.stdout[-1000:] + p.stderr[-3000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50, help="launches (per example with --example all)")
    ap.add_argument("--example", default=None, help="a docs/examples/library/ example, or 'all'")
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--port", type=int, default=0, help="the master port (0: a free one per launch)")
    ap.add_argument("--thinwire-from", default=REPO, help="the checkout whose thinwire the script imports")
    ap.add_argument("--direct", action="store_true", help="start the 2 ranks without torchrun's agent")
    args = ap.parse_args()
    if args.example is None:
        targets = [("user", [os.path.join(HERE, "exit_abort_user.py")])]
    else:
        names = EXAMPLES if args.example == "all" else [args.example]
        targets = [(n, [os.path.join(HERE, "exit_abort_example.py"), n]) for n in names]
    total = {"launches": 0, "ok": 0, "aborts": 0, "other": 0}
    t0 = time.monotonic()
    for name, script in targets:
        counts = {"launches": 0, "ok": 0, "aborts": 0, "other": 0}
        for i in range(args.n):
            rc, tail = launch(script, args.port or free_port(), args.timeout_s, args.thinwire_from, args.direct)
            counts["launches"] += 1
            aborted = "terminate called" in tail or "SIGABRT" in tail or "Signals.SIGABRT" in tail or rc == -6
            if rc == 0 and not aborted:
                counts["ok"] += 1
                print(f"[{name} #{i}] exit 0 ({time.monotonic() - t0:.0f} s so far)", flush=True)
            else:
                counts["aborts" if aborted else "other"] += 1
                print(f"[{name} #{i}] rc={rc} {'ABORT' if aborted else 'FAILED'}\n{tail[-1500:]}", flush=True)
        print(f"{name}: {counts}", flush=True)
        for k in total:
            total[k] += counts[k]
    print(f"total: {total} in {time.monotonic() - t0:.0f} s (thinwire from {args.thinwire_from}, "
          f"{'direct' if args.direct else 'torchrun'})", flush=True)
    sys.exit(1 if total["aborts"] or total["other"] else 0)


if __name__ == "__main__":
    main()
