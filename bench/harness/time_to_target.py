"""Steps to target: how many steps a method needs to reach dense DDP's quality, with a
schedule that does not fix the run's length in advance.

    python bench/time_to_target.py                    # the rows below, S = 960, seed 0, 4 ranks
    python bench/time_to_target.py --S 480 --rows "dense,local H=8"
    python bench/time_to_target.py --S 480 --rows "diloco H=8"      # target from dense's cached runs
    python bench/time_to_target.py --report           # the table from the cached runs only
    python bench/time_to_target.py --trend            # branch ends per row, k in steps (harness/steps_trend.py)
    python bench/time_to_target.py --trend --batch 32 # 4x the batch for a quarter of the steps: k in batch

The protocol (issue: overlap; reused by the time-to-target benchmark):

- every row, dense included, trains with ``optim.schedule=wsd``: linear warm-up, constant LR,
  linear decay over the last 20% of the run (``thinwire.optim.schedule``). A cosine schedule
  fixed by ``max_steps`` cannot be used: a row 2% behind at step S never catches up on it;
- per row, one constant-LR run to 1.6 S (``optim.decay_start`` = its length: no decay),
  checkpointed at 0.8 f S for f in {1, 1.25, 1.5, 2}, and one *decay branch* per f: resume
  the checkpoint at 0.8 f S with ``optim.decay_start=0.8 f S`` and ``trainer.max_steps=f S``
  (an allowed change on resume, ``thinwire.config.resume``); the branch is bitwise the run
  configured with that decay from the start (``tests/test_schedule.py``);
- target = dense DDP's val loss at the end of its own S-step run (dense's f = 1 branch);
- steps to target (:func:`steps_to_target`) = the smallest f S whose branch reaches the
  target (val loss <= target), interpolated linearly in steps between that branch and the
  previous one; ``<= S`` when the f = 1 branch reaches it already (the protocol does not
  resolve below S), 'not reached by 2S' when no branch does.

Every branch point and end must be a multiple of every row's H, so that each branch ends
on a completed outer round (at H = 8: S a multiple of 160, e.g. 320, 480, 960). The rows use
the shared quality harness's model, data, eval batches and AdamW (``bench/quality.py``).
The 'never synchronise' row (``sync=local`` with H beyond the run: four independent models,
evaluated as their average) must not reach the target; the benchmark asserts it.
torch's peers (``PEER_ROWS``: PowerSGD with its documented warm-up, PostLocalSGD) run through
``bench/cluster_peer.py --protocol``: thinwire's Trainer with torch's hook, their states in
its checkpoints, so their branches resume as thinwire's do (checked bitwise against a run
configured with the branch's decay from the start: docs/cluster.md).
Runs are cached under ``bench/results/time_to_target/runs/``, keyed by their overrides and
thinwire's code version (``harness/runs.py``); the rows are the catalogue's (``harness/catalogue.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction
from functools import reduce
from typing import Optional

from . import RESULTS, manifest, runs
from .catalogue import MODEL, NEVER, PEER_ROWS, peer_args, period
from .catalogue import TTT_ROWS as ROWS
from .catalogue import overrides as row_overrides
from .runs import done, wait_for

OUT = os.path.join(RESULTS, "time_to_target")
FS = (1, 1.25, 1.5, 2)
CONSTANT_TO = 1.6  # the constant run's length, in S: the last branch starts there
LR_WARMUP = 20  # configs/optim/adamw.yaml's warmup_steps


# -- the protocol's arithmetic (pure; unit-tested in tests/test_time_to_target.py) --------------
def branch_points(S: int, fs=FS) -> list[tuple[float, int, int]]:
    """``(f, decay start 0.8 f S, end f S)`` per branch; each must be a whole step."""
    out = []
    for f in fs:
        start, end = Fraction(4, 5) * Fraction(str(f)) * S, Fraction(str(f)) * S
        if start.denominator != 1 or end.denominator != 1:
            raise ValueError(f"--S={S}: 0.8 f S and f S must be whole steps for f={f} (got {float(start)}, {float(end)})")
        out.append((f, int(start), int(end)))
    return out


def trend_points(ends) -> list[tuple[int, int, int]]:
    """``--branches``: ``(end, decay start 0.8 end, end)`` per branch end, in increasing order;
    each must be a whole step (the trunk is constant to 0.8 x the last end, :func:`trunk_steps`)."""
    out = []
    for end in sorted(set(ends)):
        start = Fraction(4, 5) * end
        if end <= 0 or start.denominator != 1:
            raise ValueError(f"--branches: {end}: 0.8 x {end} must be a whole step (take a multiple of 5)")
        out.append((end, int(start), end))
    return out


def points(a) -> list[tuple]:
    """The invocation's branches: ``--branches`` ends, else the f S of ``FS``."""
    return trend_points(a.branches) if getattr(a, "branches", None) else branch_points(a.S)


def trunk_steps(a) -> int:
    """The constant-LR trunk's length: the last branch's decay start."""
    return max(start for _, start, _ in points(a)) if getattr(a, "branches", None) else constant_steps(a.S)


def check_multiple(S: int, H: int, fs=FS, ends=None) -> None:
    """Every branch starts and ends on a completed outer round of H inner steps (``ends``: the
    ``--branches`` protocol's branch ends instead of ``S`` x ``fs``)."""
    if ends:
        pts, trunk, flag = trend_points(ends), Fraction(4, 5) * max(ends), "--branches"
    else:
        pts, trunk, flag = branch_points(S, fs), constant_steps(S), f"--S={S}"
    bad = [n for _, a, b in pts for n in (a, b, trunk) if n % H]
    if bad:
        hint = "" if ends else " (take S a multiple of 160 at H=8)"
        raise ValueError(f"{flag}: step {bad[0]} is not a multiple of H={H}{hint}")


def constant_steps(S: int) -> int:
    n = Fraction(str(CONSTANT_TO)) * S
    if n.denominator != 1:
        raise ValueError(f"--S={S}: 1.6 S must be a whole step")
    return int(n)


def checkpoint_every(S: int, fs=FS, pts=None) -> int:
    """One cadence that writes a checkpoint at every branch start (their gcd; ``pts``: these
    branch points instead of ``S`` x ``fs``'s)."""
    return reduce(math.gcd, [a for _, a, _ in (pts or branch_points(S, fs))])


def steps_to_target(S: int, losses: dict, target: float) -> tuple[Optional[float], str]:
    """``(steps, how)`` from the branches' final val losses ``{f: loss}``: the first f (in
    increasing order) whose loss is <= ``target``; linear interpolation in steps between
    (f_prev S, L_prev) and (f S, L_f), where L_prev > target >= L_f:
    steps = S (f_prev + (L_prev - target) / (L_prev - L_f) (f - f_prev)). The f = 1 branch
    reaching it gives ``(S, '<= S')``; none reaching it gives ``(None, 'not reached by 2S')``
    (by the last f's S). A missing branch (loss None) ends the search there."""
    prev = None
    for f in sorted(losses):
        loss = losses[f]
        if loss is None:
            break
        if loss <= target:
            if prev is None:
                return float(f * S), f"<= {f:g}S"
            fp, lp = prev
            return S * (fp + (lp - target) / (lp - loss) * (f - fp)), "interpolated"
        prev = (f, loss)
    return None, "no branch" if prev is None else f"not reached by {prev[0]:g}S"


def fair_warmup(row: str, S: int) -> int:
    """Plain-DDP steps a torch peer row starts with, at the protocol's S (dense's run: the
    'total training steps' of torch's advice). PowerSGD: torch's PowerSGDState docs, "start
    with 10% of total training steps ... no less than the number of warm-up steps" (the LR's
    20): max(20, S/10). PostLocalSGD: torch's recipe in the cluster matrix, H-1 steps, so that
    its averages fall on every multiple of H (the protocol's checkpoints and evaluations)."""
    kind, k = PEER_ROWS[row]
    return max(LR_WARMUP, math.ceil(S / 10)) if kind == "powersgd" else k - 1


def peer_flags(row: str, S: int) -> list[str]:
    """bench/cluster_peer.py's flags for a torch peer row ([] for thinwire's rows); they are part
    of the row's overrides (and so of its run dirs' names)."""
    if row not in PEER_ROWS:
        return []
    kind, k = PEER_ROWS[row]
    if kind == "fp16":  # no state, no warm-up
        return peer_args(row)
    # PostLocalSGD: ranks agree after the averages, so the drift check runs on them
    return [*peer_args(row), f"--start-iter={fair_warmup(row, S)}",
            *([f"trainer.drift_check_every={k}"] if kind == "postlocal" else [])]


def show(steps: Optional[float], how: str, S: int) -> str:
    if steps is None:
        return how
    if how.startswith("<="):
        return f"<= {steps:.0f} ({how})"
    return f"{steps:.0f} ({steps / S:.3f} S)"


# -- the runs -------------------------------------------------------------------------------------
def model(batch: Optional[int] = None) -> list[str]:
    """The harness's model and data overrides; ``batch`` (``--batch``): that per-rank batch in
    place of ``MODEL``'s ``data.batch_size`` (None: ``MODEL`` as it is, so the base batch's
    cached runs keep their keys)."""
    if batch is None:
        return list(MODEL)
    return [o if not o.startswith("data.batch_size=") else f"data.batch_size={batch}" for o in MODEL]


def base(row: str, seed: int, a) -> list[str]:
    return [*row_overrides(row), *peer_flags(row, a.S), *model(getattr(a, "batch", None)), f"optim.lr={a.lr}",
            "optim.schedule=wsd",
            f"trainer.seed={seed}", "trainer.sample_chars=0", "trainer.progress=false", "logger=none",
            f"dist.nproc={a.nproc}"]


def _dir(kind: str, ov: list[str]) -> str:
    return runs.run_dir(os.path.join(OUT, "runs"), ov, kind)


def constant_run(row: str, seed: int, a) -> str:
    """The constant-LR run to 1.6 S, its checkpoints kept at every branch start (run unless
    cached or ``a.report``)."""
    n = trunk_steps(a)
    ov = [*base(row, seed, a), f"trainer.max_steps={n}", f"optim.decay_start={n}",
          f"trainer.checkpoint_every={checkpoint_every(a.S, pts=points(a))}", "trainer.keep_checkpoints=0",
          f"trainer.eval_every={n}"]
    d = _dir("const", ov)
    if not a.report:  # a report reads the cache as it is, never waits for a run in flight
        wait_for(d)
    if not done(d, n) and not a.report:
        runs.launch(ov, d, {"row": row, "seed": seed, "kind": "constant"}, f"{row!r} constant to {n}")
    return d


def branch(row: str, seed: int, a, const: str, start: int, end: int) -> Optional[dict]:
    """The decay branch over [start, end] from the constant run's checkpoint at ``start``:
    its last metrics row (run unless cached or ``a.report``)."""
    ck = os.path.join(const, "checkpoints", f"step_{start:08d}")
    ov = [*base(row, seed, a), f"trainer.max_steps={end}", f"optim.decay_start={start}", f"trainer.resume={ck}",
          f"trainer.checkpoint_every={end}", f"trainer.eval_every={end}"]
    d = _dir("branch", ov)
    if not a.report:
        wait_for(d)
    rec = done(d, end)
    if rec is None and not a.report:
        if os.path.exists(d):  # an unfinished attempt: kept aside, the branch starts again
            os.replace(d, f"{d}.previous-{int(time.time())}")
        runs.launch(ov, d, {"row": row, "seed": seed, "kind": "branch", "start": start, "end": end},
                    f"{row!r} branch {start}->{end}", fresh=False)
        rec = done(d, end)
    return rec


def protocol(row: str, seed: int, a) -> dict:
    """``{f: final val loss}`` of the row's branches (``--branches``: ``{end: ...}``; None: not run)."""
    from concurrent.futures import ThreadPoolExecutor

    const = constant_run(row, seed, a)
    pts = points(a)
    chosen = set(a.branches) if getattr(a, "branches", None) else set(a.fs)
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each branch is its own subprocess
        recs = dict(zip([f for f, _, _ in pts], pool.map(
            lambda p: branch(row, seed, a, const, p[1], p[2]) if p[0] in chosen or a.report else None, pts)))
    cached = argparse.Namespace(**{**vars(a), "report": True})  # branches not selected: from the cache
    recs = {f: r if r is not None or a.report else branch(row, seed, cached, const, s, e)
            for (f, s, e), r in zip(pts, recs.values())}
    return {f: None if r is None else r["val_loss"] for f, r in recs.items()}


def table(results: dict, target: float, a) -> str:
    lines = [f"S = {a.S} steps, {a.nproc} ranks, seed {a.seed}, AdamW lr {a.lr} with wsd (20 warm-up steps, "
             f"linear decay over the last 20%), val loss on 64 fixed batches; target = dense's val loss at "
             f"the end of its S-step run = {target:.4f}.", "",
             "| row | " + " | ".join(f"branch {f:g}S ({f * a.S:g} steps)" for f in FS) + " | steps to target |",
             "|---|" + "---|" * len(FS) + "---|"]
    for row, losses in results.items():
        steps, how = steps_to_target(a.S, losses, target)
        cells = " | ".join("" if losses.get(f) is None else f"{losses[f]:.4f}" for f in FS)
        lines.append(f"| {row} | {cells} | {show(steps, how, a.S)} |")
    return "\n".join(lines)


def with_other_rows(results: dict, target: float, a) -> dict:
    """``results`` and every other row known for this S and seed, in ``ROWS`` order, so that a
    call naming some rows does not drop the others from ``S<S>_seed<seed>.json``: a row's
    cached runs, else its entry in that file when the file has the same target (the same
    dense run)."""
    cached = argparse.Namespace(**{**vars(a), "report": True})
    known = dict(results)
    path = os.path.join(OUT, f"S{a.S}_seed{a.seed}.json")
    old = {}
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("target") == target:
            key = {str(f): f for f in FS}  # the file's keys are str(f) of FS's
            old = {r: {key.get(f, float(f)): v for f, v in res.items()} for r, res in saved["results"].items()}
    for r in ROWS:
        if r in known:
            continue
        res = protocol(r, a.seed, cached)
        if any(v is not None for v in res.values()):
            known[r] = res
        elif r in old:
            known[r] = old[r]
    return {r: known[r] for r in ROWS if r in known}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS),
                    help="comma-separated row names; without dense, the target comes from dense's cached runs "
                         "(rows can then run in parallel invocations)")
    ap.add_argument("--S", type=int, default=960)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--report", action="store_true", help="only tabulate the cached runs")
    ap.add_argument("--jobs", type=int, default=1, help="branches of a row run at once")
    ap.add_argument("--fs", type=float, nargs="*", default=list(FS), help="the branches to run (others: cached)")
    ap.add_argument("--trend", action="store_true",
                    help="the trend in steps (harness/steps_trend.py): dense's curve and the rows' k at 1200, 2400, "
                         "4800 steps; --rows default: its rows")
    ap.add_argument("--batch", type=int, default=None,
                    help="with --trend: the per-rank batch of every run (data.batch_size, part of the runs' cache "
                         "keys); the trend in batch at equal tokens (harness/steps_trend.py's BATCH_STUDY)")
    a = ap.parse_args(argv)
    if a.batch is not None and not a.trend:
        ap.error(f"--batch={a.batch}: only with --trend (the trend in batch)")
    if a.batch is not None and a.batch <= 0:
        ap.error(f"--batch={a.batch}: must be a positive number of sequences per rank")
    if a.trend:
        from .steps_trend import TREND_ROWS, run_trend

        rows = a.rows if any(o.startswith("--rows") for o in (sys.argv[1:] if argv is None else argv)) else ""
        return run_trend(a, [r.strip() for r in rows.split(",") if r.strip()] or list(TREND_ROWS), argv)
    names = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in names:
        if r not in ROWS:
            raise SystemExit(f"--rows: unknown row {r!r} (expected one of {', '.join(ROWS)})")
        check_multiple(a.S, period(r))  # fail before any run, not after an hour
    results = {r: protocol(r, a.seed, a) for r in names}
    dense = results.get("dense") or protocol("dense", a.seed, argparse.Namespace(**{**vars(a), "report": True}))
    target = dense[1]
    if target is None:
        print("dense's S-step branch is not run yet: no target; branch val losses:", json.dumps(results))
        return 0
    results = with_other_rows(results, target, a)
    text = table(results, target, a)
    print(text)
    os.makedirs(OUT, exist_ok=True)
    doc = {"args": vars(a), "target": target, "results": {r: {str(f): v for f, v in res.items()}
                                                          for r, res in results.items()},
           "steps_to_target": {r: steps_to_target(a.S, res, target) for r, res in results.items()}}
    manifest.write(os.path.join(OUT, f"S{a.S}_seed{a.seed}.json"), doc, "bench/time_to_target.py", argv)
    manifest.write(os.path.join(OUT, f"S{a.S}_seed{a.seed}.md"), text + "\n", "bench/time_to_target.py", argv)
    if NEVER in results:  # the protocol's sanity check: ranks that never synchronise must not get there
        steps, how = steps_to_target(a.S, results[NEVER], target)
        assert steps is None, f"{NEVER!r} reached the target ({how}): the target is too easy"
    return 0

