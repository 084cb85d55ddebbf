"""The network clock's steps to target: the 4-rank time-to-target protocol's results
(bench/time_to_target.py) that the projections read (``steps_to_target``, ``ttt_table``), the
rows it runs for the clock (``TTT_ROWS``, ``run_ttt``: ``bench/netclock.py --ttt``) and the
rows that take another row's steps (``ASSUMED``).
"""
from __future__ import annotations

import argparse
import json
import os

from . import RESULTS, manifest
from . import time_to_target as t
from .catalogue import CLOCK_TTT_ROWS as TTT_ROWS
from .catalogue import period

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
           "torchft streaming H=8 F=4 tau=1 (fp8)": ("stream H=8 F=4 tau=1 diloco-recipe", TORCHFT_STREAM_NOTE),
           "sparseloco H=8 two_phase": ("sparseloco H=8", "the all-gather's: two_phase's owners re-select k per run "
                                                          "and keep a residual; its quality is not measured here")}


def run_ttt(rows: list[str], S: int = 160) -> dict:
    """Run ``rows`` (``TTT_ROWS``) through bench/time_to_target.py's protocol (its functions;
    runs cached under its runs/) and add their branch losses to results/netclock_ttt_S<S>.json;
    the target is dense's, from time_to_target/S<S>_seed0.json."""
    for r in rows:
        if r not in TTT_ROWS and r not in t.ROWS:  # bench/time_to_target.py's own rows (its torch peers among them)
            raise SystemExit(f"--ttt: unknown row {r!r} (expected one of {', '.join([*TTT_ROWS, *t.ROWS])})")
        t.check_multiple(S, period(r))
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
        manifest.write(path, doc, "bench/netclock.py", ["--ttt", ",".join(rows), "--ttt-S", str(S)])
    return doc


def ttt_table() -> str:
    """bench/time_to_target.py's table of every row in ``TTT_FILES`` (branch val losses, steps
    to target)."""
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
            steps, how = t.steps_to_target(S, {float(f): v for f, v in losses.items()}, target)
            rows[row] = (None if steps is None else steps / S, how)
    return rows, target, S
