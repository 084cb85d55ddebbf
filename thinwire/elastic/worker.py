"""One replica slot as a process over torchft (``python -m thinwire.elastic.worker``): the
same round loop as the simulator (``protocol.ElasticRunner``) over
:class:`~.membership.TorchftMembership`. Writes its tape records to ``<out>/slot<s>.jsonl``
(appended across restarts) and, when it finishes, ``<out>/slot<s>.final.json`` (round,
consensus and parameter digests, losses, the addresses it advertised).

Drills (first attempt only: ``THINWIRE_ELASTIC_ATTEMPT`` from the launcher, or torchrun's
``TORCHELASTIC_RESTART_COUNT``): ``--kill-at ROUND:STEP`` SIGKILLs this process before that
global step of that round; ``--kill-in-collective ROUND`` SIGKILLs it after the header of
that round's sync, inside its outer collective; ``--stop-at ROUND:SECONDS`` SIGSTOPs it before
that round (a helper sends SIGCONT after SECONDS; it writes ``<out>/cont.<slot>`` when it next
asks for a quorum).
``--wait-at ROUND:FILE`` paces a survivor (drills on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def attempt() -> int:
    return int(os.environ.get("THINWIRE_ELASTIC_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


class ProcessFaults:
    def __init__(self, slot: int, kill_at, kill_in_collective, step_sleep: float, wait_at=None,
                 local_steps: int = 1, stop_at=None, out: str = "."):
        first = attempt() == 0
        self.wait_at, self.H, self.out = wait_at, local_steps, out
        self.stop_at = stop_at if first else None
        self.kill_at = kill_at if first else None
        self.kill_in_collective = kill_in_collective if first else None
        self.step_sleep = step_sleep

    def in_training(self, slot: int, rnd: int, step: int) -> None:
        if self.kill_at == (rnd, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.stop_at is not None and step == self.stop_at[0] * self.H:
            # SIGSTOP ourselves (heartbeats stop too); a helper sends SIGCONT after the pause
            subprocess.Popen(["sh", "-c", f"sleep {self.stop_at[1]}; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
            self.stop_at, self.resumed = None, True
        if self.wait_at is not None and step == self.wait_at[0] * self.H:
            deadline = time.monotonic() + 300
            while not os.path.exists(self.wait_at[1]) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def before_sync(self, slot: int, rnd: int) -> None:
        if getattr(self, "resumed", False):  # back from SIGSTOP and about to ask for a quorum
            open(os.path.join(self.out, f"cont.{slot}"), "w").close()
            self.resumed = False

    def before_data(self, slot: int, rnd: int) -> None:
        if self.kill_in_collective == rnd:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thinwire.elastic.worker")
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--lighthouse", required=True, help="host:port of torchft_lighthouse")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--spec", default="{}", help="ReplicaSpec fields as JSON")
    ap.add_argument("--out", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--min-replicas", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    ap.add_argument("--quorum-timeout-s", type=float, default=60.0)
    ap.add_argument("--heartbeat-ms", type=int, default=100)
    ap.add_argument("--kill-at", default=None, help="ROUND:STEP")
    ap.add_argument("--kill-in-collective", type=int, default=None)
    ap.add_argument("--stop-at", default=None, help="ROUND:SECONDS: SIGSTOP before that round, SIGCONT after")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per inner step (drills)")
    ap.add_argument("--wait-at", default=None,
                    help="ROUND:FILE: before that round's first step wait until FILE exists (drill pacing)")
    ap.add_argument("--start-barrier", action="store_true",
                    help="first attempt: wait until every slot's Manager is up before round 0")
    a = ap.parse_args(argv)

    from .launch import start_barrier
    from .membership import TorchftMembership
    from .protocol import ElasticRunner
    from .replica import Replica, ReplicaSpec

    spec = ReplicaSpec(**json.loads(a.spec))
    os.makedirs(a.out, exist_ok=True)
    joiner = attempt() > 0
    rep = Replica(spec, a.slot, joiner=joiner)  # before the Manager: heartbeats start when it can ask
    m = TorchftMembership(a.slot, a.lighthouse, host=a.host, min_replicas=a.min_replicas, timeout_s=a.timeout_s,
                          quorum_timeout_s=a.quorum_timeout_s, heartbeat_ms=a.heartbeat_ms)
    open(os.path.join(a.out, f"up.{a.slot}.{attempt()}"), "w").close()
    if a.start_barrier and not joiner:
        start_barrier(a.out, a.slot, spec.nominal, float("inf"))
    kill_at = tuple(int(x) for x in a.kill_at.split(":")) if a.kill_at else None
    wait_at = None
    if a.wait_at:
        r, _, path = a.wait_at.partition(":")
        wait_at = (int(r), path if os.path.isabs(path) else os.path.join(a.out, path))
    stop_at = (int(a.stop_at.split(":")[0]), float(a.stop_at.split(":")[1])) if a.stop_at else None
    faults = ProcessFaults(a.slot, kill_at, a.kill_in_collective, a.step_sleep, wait_at, spec.local_steps,
                           stop_at, a.out)
    log_path = os.path.join(a.out, f"slot{a.slot}.jsonl")

    def log(rec):
        rec = dict(rec, slot_writer=a.slot, attempt=attempt(), t=time.time())
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    log({"kind": "start", "joiner": joiner})
    try:
        ElasticRunner(rep, m, a.rounds, min_replicas=a.min_replicas, faults=faults, log=log).run()
    except Exception as e:  # one line, as the trainer reports
        print(f"slot {a.slot}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(a.out, f"slot{a.slot}.final.json"), "w") as f:
        json.dump({"slot": a.slot, "round": rep.round, "consensus": rep.consensus_digest(),
                   "params": rep.params_digest(), "losses": {str(k): v for k, v in rep.losses.items()},
                   "advertised": m.advertised(), "attempt": attempt()}, f)
    m.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
