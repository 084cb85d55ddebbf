"""Self-launch of elastic slots on one machine (tests, drills, the demo) and the torchrun-style
commands for several machines.

:func:`launch`: start ``torchft_lighthouse --bind <host>:<port>``, one process per slot
(``python -m thinwire.elastic.worker``), restart a slot whose process dies (up to
``max_restarts``; faults fire only in a slot's first attempt), and return when every slot has
exited. torch elastic restarts a whole worker group on any change, so slots never share one
launch: each slot is its own process (or its own ``torchrun --max-restarts``), joined only
through the lighthouse. ``DRY_RUN=1`` (or ``dry_run=True``) prints the commands instead.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .config import ElasticConfig

DRIFT_EXIT = 4  # a slot's exit status after replica drift over the live set: no slot is restarted, the run stops


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lighthouse_command(el: ElasticConfig, host: str, port: int) -> list[str]:
    exe = shutil.which("torchft_lighthouse") or os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
    return [exe if os.path.exists(exe) else "torchft_lighthouse", "--bind", f"{host}:{port}", "--min_replicas", str(el.min_replicas),
            "--join_timeout_ms", str(int(el.grace_s * 1000)), "--quorum_tick_ms", "50",
            "--heartbeat_timeout_ms", str(el.heartbeat_timeout_ms)]


def worker_command(slot: int, lighthouse: str, rounds: int, out: str, el: ElasticConfig, spec: dict,
                   extra: Optional[list[str]] = None, torchrun: bool = False) -> list[str]:
    args = ["--slot", str(slot), "--lighthouse", lighthouse, "--rounds", str(rounds), "--out", out,
            "--spec", json.dumps(spec), "--min-replicas", str(el.min_replicas), "--timeout-s", str(el.timeout_s),
            "--quorum-timeout-s", str(el.quorum_timeout_s), "--heartbeat-ms", str(el.heartbeat_ms)]
    if torchrun:
        return ["torchrun", "--nnodes=1", "--nproc-per-node=1", f"--max-restarts={el.max_restarts}",
                "--rdzv-backend=c10d", f"--rdzv-id=thinwire-slot{slot}", "--rdzv-endpoint=127.0.0.1:0",
                "-m", "thinwire.elastic.worker", *args, *(extra or [])]
    return [sys.executable, "-m", "thinwire.elastic.worker", *args, *(extra or [])]


@dataclass
class LaunchResult:
    returncodes: dict = field(default_factory=dict)     # slot -> last exit status
    restarts: dict = field(default_factory=dict)        # slot -> restarts used
    lighthouse: str = ""
    events: list = field(default_factory=list)          # (time, slot, event)


def launch(slots: int, rounds: int, out: str, el: Optional[ElasticConfig] = None, *, spec: Optional[dict] = None,
           host: str = "127.0.0.1", port: int = 0, slot_args: Optional[dict] = None, timeout_s: float = 120.0,
           finish_grace_s: float = 30.0,
           dry_run: Optional[bool] = None) -> LaunchResult:
    """Run ``slots`` slots for ``rounds`` rounds; ``slot_args``: {slot: [extra worker args]}
    (drills). Returns exit statuses and restart counts."""
    el = el or ElasticConfig(name="torchft")
    spec = dict(spec or {}, nominal=slots)
    port = port or free_port(host)
    lh = f"{host}:{port}"
    cmds = {s: worker_command(s, lh, rounds, out, el, spec, (slot_args or {}).get(s)) for s in range(slots)}
    if dry_run if dry_run is not None else os.environ.get("DRY_RUN") == "1":
        print(shlex.join(lighthouse_command(el, host, port)) + " &")
        for s in range(slots):
            print(shlex.join(cmds[s]) + " &")
        return LaunchResult(lighthouse=lh)
    return supervise(cmds, out, el, host, port, timeout_s=timeout_s, finish_grace_s=finish_grace_s)


def supervise(cmds: dict, out: str, el: ElasticConfig, host: str, port: int, *, timeout_s: Optional[float] = None,
              finish_grace_s: float = 30.0, start_lighthouse: bool = True) -> LaunchResult:
    """Start the lighthouse on ``host:port`` (unless ``start_lighthouse`` is False: one runs
    already) and ``cmds[s]`` for every slot s; restart a slot whose process exits non-zero
    up to ``el.max_restarts`` times (attempt k sees ``THINWIRE_ELASTIC_ATTEMPT=k`` and, for the
    trainer's fault injection, ``TORCHELASTIC_RESTART_COUNT=k``); once a slot has finished
    (exit 0) the others get ``finish_grace_s`` to finish, then are killed."""
    os.makedirs(out, exist_ok=True)
    res = LaunchResult(lighthouse=f"{host}:{port}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = lighthouse_command(el, host, port)
    if not os.path.exists(cmd[0]):  # torchft's script is not installed here: its entry point, by file
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lighthouse.py"), *cmd[1:]]
    lighthouse = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                   stderr=open(os.path.join(out, "lighthouse.log"), "w"))
                  if start_lighthouse else None)
    procs: dict[int, subprocess.Popen] = {}
    t0 = time.monotonic()

    def start(s: int, attempt: int):
        log = open(os.path.join(out, f"slot{s}.attempt{attempt}.log"), "w")
        procs[s] = subprocess.Popen(cmds[s], env=dict(env, THINWIRE_ELASTIC_ATTEMPT=str(attempt),
                                                      TORCHELASTIC_RESTART_COUNT=str(attempt)),
                                    stdout=log, stderr=subprocess.STDOUT)
        res.events.append((round(time.monotonic() - t0, 3), s, f"start attempt {attempt}"))

    try:
        for s in sorted(cmds):
            res.restarts[s] = 0
            start(s, 0)
        running = set(cmds)
        done_at = None   # when the first slot finished: the others get finish_grace_s
        while running:
            if done_at is not None and time.monotonic() - done_at > finish_grace_s:
                for s in sorted(running):
                    procs[s].kill()
                    res.returncodes[s] = procs[s].wait()
                    res.events.append((round(time.monotonic() - t0, 3), s, "killed: training had completed"))
                break
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"elastic launch: slots {sorted(running)} still running after {timeout_s}s")
            for s in sorted(running):
                rc = procs[s].poll()
                if rc is None:
                    continue
                res.returncodes[s] = rc
                if rc == 0 and done_at is None:
                    done_at = time.monotonic()
                res.events.append((round(time.monotonic() - t0, 3), s, f"exit {rc}"))
                if rc in (2, DRIFT_EXIT):  # a config error, replica drift (said in one line by the slot):
                    return res             # the others cannot do better
                if rc != 0 and res.restarts[s] < el.max_restarts:
                    res.restarts[s] += 1
                    start(s, res.restarts[s])
                else:
                    running.discard(s)
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        if lighthouse is not None:
            lighthouse.kill()
            lighthouse.wait()
    return res


def start_barrier(out: str, slot: int, slots: int, timeout_s: float) -> None:
    """A first attempt's start: mark this slot ready and wait until every slot is (so round 0's
    quorum holds them all), or ``timeout_s`` passed (then the late ones join as joiners do)."""
    open(os.path.join(out, f"ready.{slot}"), "w").close()
    deadline = time.monotonic() + timeout_s
    while (not all(os.path.exists(os.path.join(out, f"ready.{s}")) for s in range(slots))
           and time.monotonic() < deadline):
        time.sleep(0.05)


def slot_commands(cfg, job: list[str], lighthouse: str, torchrun: bool = False) -> dict[int, list[str]]:
    """``thinwire-train elastic=torchft``'s slots: ``thinwire-train --slot s`` with the
    run's overrides and its resolved run dir (every slot, every attempt, writes there), or one
    ``torchrun --max-restarts`` per slot (``torchrun``: the commands for several machines)."""
    overrides = [o for o in job if not o.startswith("hydra.run.dir=")] + [f"hydra.run.dir={cfg.run_dir}"]
    out = {}
    for s in range(cfg.dist.nproc):
        args = ["-m", "thinwire.train", "--slot", str(s), "--lighthouse", lighthouse, *overrides]
        out[s] = (["torchrun", "--nnodes=1", "--nproc-per-node=1", f"--max-restarts={cfg.elastic.max_restarts}",
                   "--rdzv-backend=c10d", f"--rdzv-id=thinwire-slot{s}", "--rdzv-endpoint=127.0.0.1:0", *args]
                  if torchrun else [sys.executable, *args])
    return out


def launch_trainer(cfg, job: list[str]) -> int:
    """``thinwire-train ... elastic=torchft dist.nproc=N``: the lighthouse on ``dist.master_addr``
    (unless ``elastic.lighthouse`` names a running one) and N slot processes, each restarted up to
    ``elastic.max_restarts`` times; 0 once training has completed. ``DRY_RUN=1`` prints the
    torchrun-style commands (the lighthouse, then one ``torchrun`` per slot) instead."""
    from omegaconf import OmegaConf

    el = ElasticConfig(**OmegaConf.to_container(cfg.elastic, resolve=True))
    host, port = cfg.dist.master_addr, el.lighthouse_port
    if el.lighthouse:
        host, _, p = el.lighthouse.rpartition(":")
        port = int(p)
    lh = f"{host}:{port}"
    if os.environ.get("DRY_RUN") == "1":
        if not el.lighthouse:
            print(shlex.join(lighthouse_command(el, host, port)) + " &")
        for cmd in slot_commands(cfg, job, lh, torchrun=True).values():
            print(shlex.join(cmd))
        return 0
    out = os.path.join(cfg.run_dir, "elastic")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):  # a resumed run's start barrier starts afresh
        if f.startswith(("ready.", "up.")):
            os.remove(os.path.join(out, f))
    print(f"thinwire: elastic=torchft: lighthouse {lh}, {cfg.dist.nproc} slots; their logs: "
          f"{out}/slot<s>.attempt<k>.log", flush=True)
    res = supervise(slot_commands(cfg, job, lh), out, el, host, port, start_lighthouse=not el.lighthouse)
    if 2 in res.returncodes.values():
        return 2  # a config error, said by the slot in one line
    if DRIFT_EXIT in res.returncodes.values():
        print(f"thinwire-train: elastic=torchft: stopped: replica drift over the live set (the line above; "
              f"{out}/slot<s>.attempt<k>.log)", file=sys.stderr)
        return 1
    if 0 not in res.returncodes.values():
        print(f"thinwire-train: elastic=torchft: no slot completed the training (exit statuses "
              f"{res.returncodes}, restarts {res.restarts}; see {out}/slot<s>.attempt<k>.log)", file=sys.stderr)
        return 1
    print(f"thinwire: elastic=torchft: training complete (exit statuses {res.returncodes}, restarts "
          f"{res.restarts})", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m thinwire.elastic.launch --slots 3 --rounds 20 --out runs/el``: the lighthouse
    and one process per slot on this machine; ``--torchrun`` (or ``DRY_RUN=1``) prints the
    commands instead (the lighthouse, then one ``torchrun --max-restarts`` per slot)."""
    import argparse
    import dataclasses

    from ..errors import ConfigError, in_group
    from .config import check_elastic

    ap = argparse.ArgumentParser(prog="python -m thinwire.elastic.launch")
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="outputs/elastic")
    ap.add_argument("--spec", default="{}", help="ReplicaSpec fields as JSON (sync, local_steps, ...)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--torchrun", action="store_true", help="print the torchrun commands per slot")
    for f in dataclasses.fields(ElasticConfig):
        if f.name != "name":
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not False
                            else lambda v: v.lower() in ("1", "true", "yes"), default=f.default)
    a = ap.parse_args(argv)
    el = ElasticConfig(name="torchft", **{f.name: getattr(a, f.name) for f in dataclasses.fields(ElasticConfig)
                                          if f.name != "name"})
    try:
        try:
            el.check()
        except ConfigError as e:
            raise in_group("elastic", e) from None
        spec = json.loads(a.spec)
        check_elastic(el, sync="local", slots=a.slots, master_addr=a.host)
    except ConfigError as e:
        print(f"thinwire.elastic.launch: error: {e}", file=sys.stderr)
        return 2
    if a.torchrun:
        port = el.lighthouse_port
        lh = el.lighthouse or f"{a.host}:{port}"
        print(shlex.join(lighthouse_command(el, a.host, port)) + " &")
        for s in range(a.slots):
            print(shlex.join(worker_command(s, lh, a.rounds, a.out, el, dict(spec, nominal=a.slots), torchrun=True)))
        return 0
    res = launch(a.slots, a.rounds, a.out, el, spec=spec, host=a.host, port=el.lighthouse_port)
    if not res.returncodes:  # DRY_RUN=1: the commands were printed
        return 0
    print(json.dumps({"returncodes": res.returncodes, "restarts": res.restarts}))
    return 0 if all(rc == 0 for rc in res.returncodes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
