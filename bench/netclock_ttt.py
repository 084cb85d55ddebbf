"""The network clock's steps to target: the 4-rank time-to-target protocol's results
(bench/time_to_target.py) that the projections read (``steps_to_target``, ``ttt_table``), the
rows it runs for the clock (``TTT_ROWS``, ``run_ttt``: ``bench/netclock.py --ttt``) and the
rows that take another row's steps (``ASSUMED``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TORCHFT_STREAM_NOTE = ("thinwire's stream H=8 F=4 tau=1 diloco-recipe's (Nesterov 0.9, lr 0.7, alpha 0.5): torchft's "
                       "streaming at S: val 2.4618534 vs thinwire's 2.4618496 (bench/results/time_to_target/"
                       "torchft_stream_peer_S160.json); its fp8's effect on quality not measured (CUDA-only)")
TTT_FILES = ("time_to_target/S160_seed0.json", "netclock_ttt_S160.json")
# rows whose steps to target are taken from another row's when they have none of their own, and why
# (said in the table)
ASSUMED = {"torch PostLocalSGD H=8": ("local H=8", "same algorithm as local H=8 (parameter average every 8 steps)"),
           "torchft DiLoCo H=8 (fp8)": ("diloco H=8", "thinwire diloco H=8's: torchft's DiLoCo at S: val 2.5850 vs "
                                                      "thinwire's 2.5862 (bench/results/time_to_target/"
                                                      "torchft_peer_S160.json)"),
           "torchft streaming H=8 F=4 tau=1 (fp8)": ("stream H=8 F=4 tau=1 diloco-recipe", TORCHFT_STREAM_NOTE)}


# rows the 4-rank time-to-target protocol runs for the clock, beyond bench/time_to_target.py's own
# (same harness: bench/quality.py's model, data, AdamW 3e-3 + wsd, 64 eval batches, seed 0)
TTT_ROWS = {
    "bf16": (1, ["comm=bf16", "sync=ddp"]),
    "co2 H=8": (8, ["sync=co2", "sync.local_steps=8"]),
    "stream H=8 F=4 tau=1": (8, ["sync=local", "sync.local_steps=8", "sync.fragments=4", "sync.fragment_delay=1",
                                 "sync.fragment_alpha=0.5", "sync.clip=inf"]),
    "stream H=8 F=4 tau=1 + int8": (8, ["sync=local", "sync.local_steps=8", "sync.fragments=4",
                                        "sync.fragment_delay=1", "sync.fragment_alpha=0.5", "sync.clip=inf",
                                        "comm=int8"]),
    "sparseloco H=8": (8, ["experiment=sparseloco", "sync.local_steps=8"]),
    "eager H=8": (8, ["sync=co2", "sync.overlap=eager", "sync.local_steps=8", "sync.outer_optim.lr=1.0",
                      "sync.outer_optim.momentum=0.0", "sync.outer_optim.nesterov=false"]),
}


def run_ttt(rows: list[str], S: int = 160) -> dict:
    """Run ``rows`` (``TTT_ROWS``) through bench/time_to_target.py's protocol (its functions;
    runs cached under its runs/) and add their branch losses to results/netclock_ttt_S<S>.json;
    the target is dense's, from time_to_target/S<S>_seed0.json."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import time_to_target as t

    for r in rows:
        if r in TTT_ROWS:
            t.ROWS[r] = TTT_ROWS[r][1]
        elif r not in t.ROWS:  # bench/time_to_target.py's own rows (its torch peers among them) run as they are
            raise SystemExit(f"--ttt: unknown row {r!r} (expected one of {', '.join([*TTT_ROWS, *t.ROWS])})")
        t.check_multiple(S, TTT_ROWS[r][0] if r in TTT_ROWS else t.H_OF.get(r, 1))
    path = os.path.join(RESULTS, f"netclock_ttt_S{S}.json")
    with open(os.path.join(RESULTS, "time_to_target", f"S{S}_seed0.json")) as fh:
        target = json.load(fh)["target"]
    doc = {"args": {"S": S, "seed": 0, "nproc": 4, "lr": 3e-3}, "target": target, "results": {}}
    if os.path.exists(path):
        with open(path) as fh:
            doc = json.load(fh)
    a = argparse.Namespace(S=S, seed=0, nproc=4, lr=3e-3, report=False, jobs=1, fs=list(t.FS))
    for r in rows:
        doc["results"][r] = {str(f): v for f, v in t.protocol(r, 0, a).items()}
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
    return doc


def ttt_table() -> str:
    """bench/time_to_target.py's table of every row in ``TTT_FILES`` (branch val losses, steps
    to target)."""
    t = _time_to_target()
    results, target, S = {}, None, None
    for name in TTT_FILES:
        path = os.path.join(RESULTS, name)
        if os.path.exists(path):
            with open(path) as fh:
                doc = json.load(fh)
            target, S = target or doc["target"], S or doc["args"]["S"]
            results.update({r: {float(f): v for f, v in losses.items()} for r, losses in doc["results"].items()})
    return t.table(results, target, argparse.Namespace(S=S, nproc=4, seed=0, lr=3e-3))


def steps_to_target() -> tuple[dict, float, int]:
    """``{protocol row: (steps / S or None, how)}``, the target and S, from the 4-rank
    time-to-target runs (bench/time_to_target.py's protocol, seed 0)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from time_to_target import steps_to_target as stt

    rows, target, S = {}, None, None
    for name in TTT_FILES:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            doc = json.load(fh)
        target = doc["target"] if target is None else target
        S = S or doc["args"]["S"]
        for row, losses in doc["results"].items():
            steps, how = stt(S, {float(f): v for f, v in losses.items()}, target)
            rows[row] = (None if steps is None else steps / S, how)
    return rows, target, S


def _time_to_target():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import time_to_target

    return time_to_target
