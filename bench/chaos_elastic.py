"""The chaos drill's elastic cases (``python bench/chaos.py --elastic``): ``thinwire-train
elastic=torchft`` with 2 slots (sync=diloco, H=4, the tiny char-GPT, dropout off) and one fault
of slot 1 per case, each checked bitwise against its reference, the ordinary 2-rank run with
``trainer.faults.absent_at`` for the rounds the tape recorded slot 1 absent in (with 2 ranks
gloo's sum equals the elastic mean's slot-order sum, so the reference is an ordinary run):

- ``kill``: SIGKILL after step 6 (mid round 1); the launcher restarts it; slot 0 waits before
  round 3 until the new process is up (``trainer.faults.rejoin_wait_at``), which heals and rejoins;
- ``kill_in_collective``: SIGKILL inside round 2's outer collective; slot 0's collective fails and
  it retries round 2 alone (one retry, no round skipped); the restart heals and rejoins;
- ``stop``: SIGSTOP after step 6 for 8 s, beyond the heartbeat timeout (1.5 s) and the grace
  window (``elastic.grace_s=5``), then SIGCONT; slot 0 goes on alone (paced, 0.4 s a step, so that
  it is still running then); slot 1 ends its stale round (logged lost), heals and rejoins.

A case survives when the run exits 0, slot 1 is absent from the fault's round on for a
contiguous range and back by the end, and the drift guard over the live set never fired (it
runs in every round's header); its end state is equal when slot 0's loss at every step, the
round lines' ``live_slots`` and ``lost_steps``, and both slots' final parameters equal the
reference bitwise. Recorded beside them: the survivor's stall in the fault's round
(``elastic_stall_s``: G2) and the retries.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import torch

from harness import REPO

H, STEPS = 4, 24
BASE = ["experiment=tiny", "model.dropout=0.0", f"sync.local_steps={H}", "sync=diloco", "dist.nproc=2",
        "dist.threads=1", "trainer.log_every=1", "logger=none", "trainer.progress=false", "trainer.sample_chars=0"]
CASES = {
    "kill": (STEPS, ["trainer.faults.kill_at=6", "trainer.faults.rejoin_wait_at=3"]),
    "kill_in_collective": (STEPS, ["trainer.faults.kill_in_collective_at=2", "trainer.faults.rejoin_wait_at=3"]),
    "stop": (40, ["trainer.faults.stop_at=6", "trainer.faults.stop_for_s=8", "trainer.faults.step_sleep_s=0.4"]),
}


def steps(n: int) -> list[str]:
    return [f"trainer.max_steps={n}", f"trainer.eval_every={n}", f"trainer.checkpoint_every={n}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: str, args: list[str], log: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run([sys.executable, "-m", "thinwire.train", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                              stdout=fh, stderr=subprocess.STDOUT, timeout=900).returncode
    return code, time.perf_counter() - t0


def rows(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def params(run_dir: str, slot: int, n: int, elastic: bool) -> dict:
    d = os.path.join(run_dir, f"slot{slot}") if elastic else run_dir
    rank = 0 if elastic else slot
    return torch.load(os.path.join(d, "checkpoints", f"step_{n:08d}", f"rank{rank:05d}.pt"), weights_only=False)["model"]


def differences(el: str, ref: str, n: int) -> list[str]:
    out = []
    a = [(r["step"], r["loss"]) for r in rows(os.path.join(el, "slot0", "metrics.jsonl"))]
    b = [(r["step"], r["loss"]) for r in rows(os.path.join(ref, "metrics.jsonl"))]
    if a != b:
        out.append("slot 0's losses differ")
    key = ("live_slots", "lost_steps")
    a = [[r[k] for k in key] for r in rows(os.path.join(el, "metrics.jsonl")) if "live_slots" in r]
    b = [[r[k] for k in key] for r in rows(os.path.join(ref, "metrics.jsonl")) if "live_slots" in r]
    if a != b:
        out.append("round lines (live_slots, lost_steps) differ")
    for s in (0, 1):
        x, y = params(el, s, n, True), params(ref, s, n, False)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            out.append(f"slot {s}'s final parameters differ")
    return out


def case(name: str, root: str) -> dict:
    from thinwire.elastic.tape import Tape

    n, fault = CASES[name]
    el, ref = os.path.join(root, f"elastic-{name}"), os.path.join(root, f"reference-{name}")
    code, secs = train(el, [*BASE, *steps(n), "trainer.faults.rank=1", *fault, "elastic=torchft",
                            f"elastic.lighthouse_port={free_port()}", "elastic.grace_s=5"], el + ".log")
    res = {"kind": f"elastic_{name}", "exit": code, "seconds": round(secs, 1), "survived": False, "equal": False}
    tape = Tape.read([p for p in (os.path.join(el, "elastic", f"slot{s}.jsonl") for s in (0, 1)) if os.path.exists(p)]) \
        if code == 0 else None
    drift = any("replica drift" in open(os.path.join(el, "elastic", f)).read()
                for f in os.listdir(os.path.join(el, "elastic")) if f.endswith(".log")) if os.path.isdir(el) else False
    if tape is None:
        return res
    live = tape.live_sets()
    absent = [r for r, ls in enumerate(live) if 1 not in ls]
    res.update(absent_rounds=[absent[0], absent[-1]] if absent else None, drift_guard_fired=drift,
               stall_s=tape.rounds[absent[0]]["stall_s"] if absent else None,
               retries=tape.rounds[absent[0]]["retries"] if absent else None,
               steps_lost=len(absent) * H)
    res["survived"] = (bool(absent) and absent == list(range(absent[0], absent[-1] + 1)) and live[-1] == [0, 1]
                       and not drift and [e["round"] for e in tape.rounds] == list(range(n // H)))
    if not res["survived"]:
        return res
    ref_args = [a for a in fault if a.startswith("trainer.faults.rank")]
    code, _ = train(ref, [*BASE, *steps(n), *ref_args, f'trainer.faults.absent_at="1:{absent[0]}..{absent[-1]}"'],
                    ref + ".log")
    res["differences"] = differences(el, ref, n) if code == 0 else [f"reference exit {code}"]
    res["equal"] = not res["differences"]
    return res


def drill(root: str, names=tuple(CASES)) -> list[dict]:
    out = []
    for name in names:
        r = case(name, root)
        print(f"  elastic {name}: exit {r['exit']}, absent rounds {r.get('absent_rounds')}, stall {r.get('stall_s')} s, "
              f"retries {r.get('retries')}, {'equal to the reference' if r['equal'] else 'NOT equal: ' + str(r.get('differences'))} "
              f"({r['seconds']:.0f} s)", flush=True)
        out.append(r)
    return out


def markdown(results: list[dict], load: str, seconds: float) -> str:
    lines = ["| fault (slot 1 of 2, diloco H=4) | survived | end state equal to the absent_at reference | rounds absent "
             "| steps lost | survivor's stall in the fault's round | retries | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a = r.get("absent_rounds")
        lines.append(f"| {r['kind']} | {int(r['survived'])} | {int(r['equal'])} | {f'{a[0]}..{a[1]}' if a else '-'} | "
                     f"{r.get('steps_lost', '-')} | {r.get('stall_s', '-')} s | {r.get('retries', '-')} | {r['seconds']} |")
    return "\n".join(lines) + f"\n\n{len(results)} elastic faults, {sum(r['survived'] for r in results)} survived, " \
        f"{sum(r['equal'] for r in results)} equal to their reference; {seconds:.0f} s in all; {load}.\n"
