"""The shared quality harness: val loss vs dense at equal steps, paired seeds, and bytes per
parameter per inner step, on the cluster benchmark's 0.8M char-GPT.

    python bench/quality.py                       # the goal rows, 3 seeds, 4 ranks, 1200 steps
    python bench/quality.py --rows sweep --seeds 0
    python bench/quality.py --report              # tables from the cached runs only
    python bench/quality.py --simulate --rows "local H=8"   # p replicas in one process (harness/simulate.py)
    python bench/quality.py --simulate-check --rows ...      # the real path and the simulator, timed, compared

Every row runs ``thinwire-train`` with the same model (n_layer 4, n_embd 128, block 32, batch 8
per rank), data order, schedule (AdamW, cosine, ``--lr``) and 64 fixed eval batches; seeds are
paired (a method and dense share seed, init and data order) and each method is reported as the
mean and spread of its per-seed difference to dense. A run is cached under
``bench/results/quality/runs/<hash of its overrides and thinwire's code version>/``
(``harness/runs.py``) and reused when complete, so dense baselines run once per code version.
The rows and sets are the catalogue's (``harness/catalogue.py``). Bytes are the accounted
per-rank ``wire_bytes`` (evaluation traffic is ``eval_bytes`` and not counted), as B/param/step and as a ratio to a bf16 ring all-reduce of
the same model at the same p (2 (p-1)/p x 2 B/param); payload B/param/step (the papers'
basis) comes from the comm layer's compression ratio: 4 / ratio / H. Runs end on a completed
outer step (``max_steps`` is a multiple of every H used: 8, 15, 30).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from . import RESULTS, manifest, runs
from .catalogue import MODEL, PEER_ROWS, ROW_LRS, ROWS, SETS
from .runs import rows_of

OUT = os.path.join(RESULTS, "quality")


def overrides(row: str, seed: int, a) -> list[str]:
    return [*ROWS[row], *MODEL, f"optim.lr={a.lr}", f"trainer.max_steps={a.steps}", f"trainer.seed={seed}",
            f"trainer.eval_every={a.eval_every}", f"trainer.checkpoint_every={10 ** 9}", "trainer.sample_chars=0",
            "trainer.progress=false", "logger=none", f"dist.nproc={a.nproc}"]


RUNS = os.path.join(OUT, "runs")   # --runs-dir
DEADLINE = [math.inf]               # --deadline: no run starts after this time.monotonic()
SIMULATE = [False, 0]               # --simulate: run each row's ranks in this process; --sim-threads


def run_dir(ov: list[str]) -> str:
    return runs.run_dir(RUNS, ov, kind="sim" if SIMULATE[0] else "")


def run(row: str, seed: int, a) -> list[dict]:
    ov = overrides(row, seed, a)
    d = run_dir(ov)
    if runs.done(d, a.steps):
        return rows_of(d)
    if time.monotonic() > DEADLINE[0]:
        print(f"  skipped {row!r} seed {seed}: past --deadline", flush=True)
        return []
    if SIMULATE[0]:
        from . import simulate

        print(f"  simulated {row!r} seed {seed} in {simulate.simulate_run(ov, d, SIMULATE[1]):.0f} s", flush=True)
        return rows_of(d)
    runs.launch(ov, d, {"row": row, "seed": seed}, f"{row!r} seed {seed}")
    return rows_of(d)


def summary(rows: list[dict], nproc: int) -> dict:
    n_params = None
    for r in rows:
        if r.get("dense_bytes"):  # 2 (p-1)/p * n * 4
            n_params = r["dense_bytes"] / (2 * (nproc - 1) / nproc * 4)
            break
    steps = rows[-1]["step"]
    if nproc == 1:  # one replica (--nproc 1): nothing is sent, only the loss curve means something
        return {"val_loss": rows[-1]["val_loss"], "wire_B_per_param_step": 0.0, "peak_of_full": 0.0,
                "mean_of_full": 0.0, "comm_wait_ms": 0.0, "bf16_ratio": 0.0, "n_params": None,
                "curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
                "cum_wire": [(r["step"], 0) for r in rows if "val_loss" in r]}
    wire = sum(r["wire_bytes"] for r in rows)
    ratios = [r["compression_ratio"] for r in rows if "compression_ratio" in r]
    h = next((r["outer_round"] for r in rows if "outer_round" in r), None)
    rounds = max((r.get("outer_round", 0) for r in rows), default=0)
    bf16 = 2 * (nproc - 1) / nproc * 2
    per_step = [r["wire_bytes"] for r in rows]
    full = rows[0]["dense_bytes"]  # one fp32 ring all-reduce of every parameter (a full pseudo-gradient), per rank
    out = {"val_loss": rows[-1]["val_loss"], "wire_B_per_param_step": wire / steps / n_params,
           "peak_of_full": max(per_step) / full, "mean_of_full": wire / steps / full,
           "comm_wait_ms": 1000 * sum(r.get("comm_wait_s", 0.0) for r in rows) / steps,
           "bf16_ratio": (wire / steps / n_params) / bf16, "n_params": n_params,
           "curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
           "cum_wire": [(r["step"], sum(x["wire_bytes"] for x in rows if x["step"] <= r["step"]))
                        for r in rows if "val_loss" in r]}
    warm = [r for r in rows if r.get("variance_frozen") == 0.0]
    frozen = [r for r in rows if r.get("variance_frozen") == 1.0]
    if warm and frozen:  # optim=adam1bit: its dense warm-up and its compressed stage, apart
        out["warmup_steps"] = len(warm)
        out["warmup_B_per_param_step"] = sum(r["wire_bytes"] for r in warm) / len(warm) / n_params
        out["frozen_B_per_param_step"] = sum(r["wire_bytes"] for r in frozen) / len(frozen) / n_params
    gathers = [r for r in rows if "gather_s" in r]
    if gathers:  # optim=demo: the gather's duration and the time blocked on it (hidden = 1 - wait / duration)
        out["gather_ms"] = 1000 * sum(r["gather_s"] for r in gathers) / len(gathers)
        out["gather_wait_ms"] = 1000 * sum(r["gather_wait_s"] for r in gathers) / len(gathers)
        out["step_ms"] = 1000 * sum(r["step_time_s"] for r in gathers) / len(gathers)
    if ratios and rounds:
        out["payload_B_per_param_step"] = 4 / statistics.mean(ratios) * rounds / steps
    elif ratios:
        out["payload_B_per_param_step"] = 4 / statistics.mean(ratios)
    return out


def paired(per_seed: dict, ref: dict) -> str:
    """Mean and spread (min..max) over the seeds both have of (row - ref) / ref."""
    d = [(per_seed[s]["val_loss"] - ref[s]["val_loss"]) / ref[s]["val_loss"] for s in sorted(per_seed) if s in ref]
    return f"{100 * statistics.mean(d):+.2f}% ({100 * min(d):+.2f}..{100 * max(d):+.2f})" if d else ""


def report(results: dict, a) -> str:
    dense = results.get("dense", {})
    lines = [f"{a.nproc} ranks, AdamW lr {a.lr}, {a.steps} steps, val loss on 64 fixed batches; "
             f"'vs dense' = mean (and spread, min..max) over paired seeds of (method - dense) / dense.", "",
             "| row | LR | seeds | val loss (mean) | vs dense | vs local, same H | wire B/param/step | x of bf16 all-reduce "
             "| payload B/param/step | peak / mean B per step (x full fp32 all-reduce) | comm wait ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, per_seed in results.items():
        seeds = sorted(per_seed)
        vals = [per_seed[s]["val_loss"] for s in seeds]
        vs = paired(per_seed, dense) if row != "dense" else ""
        h = re.search(r"\bH=(\d+)", row)
        vs_local = paired(per_seed, results.get(f"local H={h.group(1)}", {})) if h and row != f"local H={h.group(1)}" else ""
        s0 = per_seed[seeds[0]]
        ratio = s0["bf16_ratio"]  # the same for every seed: bytes do not depend on the data
        payload = s0.get("payload_B_per_param_step")
        lines.append(f"| {row} | {s0.get('lr', a.lr):g} | {len(seeds)} | {statistics.mean(vals):.4f} | {vs} | {vs_local} "
                     f"| {s0['wire_B_per_param_step']:.5f} "
                     f"| {'1/%.0f' % (1 / ratio) if 0 < ratio < 1 else '%.2f' % ratio} | "
                     f"{'' if payload is None else '%.5f' % payload} | {s0['peak_of_full']:.3f} / {s0['mean_of_full']:.4f} "
                     f"| {statistics.mean(per_seed[s]['comm_wait_ms'] for s in seeds):.1f} |")
    for row, per_seed in results.items():
        g = [per_seed[s] for s in sorted(per_seed) if "gather_ms" in per_seed[s]]
        if g and "optim.overlap=true" not in ROWS.get(row, []):   # synchronous: every gather blocks
            lines.append(f"\n{row}: gather {statistics.mean(x['gather_ms'] for x in g):.2f} ms/step, all of it "
                         f"blocking (synchronous); step {statistics.mean(x['step_ms'] for x in g):.1f} ms")
        elif g:
            dur, wait = statistics.mean(x["gather_ms"] for x in g), statistics.mean(x["gather_wait_ms"] for x in g)
            lines.append(f"\n{row}: gather {dur:.2f} ms/step, blocked {wait:.2f} ms/step, hidden {1 - wait / dur:.1%}; "
                         f"step {statistics.mean(x['step_ms'] for x in g):.1f} ms (mean of {len(g)} seeds)")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, per_seed in results.items():
        s0 = per_seed[sorted(per_seed)[0]]
        xs = [max(b, 1) / (s0["n_params"] or 1) for _, b in s0["cum_wire"]]
        ys = [statistics.mean(per_seed[s]["curve"][i][1] for s in per_seed) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent per rank / parameters (log)")
    ax.set_ylabel("val loss (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def simulate_check(names: list[str], seeds_of: dict, a, argv) -> int:
    """--simulate-check: every row real and simulated, one after the other (harness/simulate.py)."""
    from . import simulate

    root = os.path.join(RUNS, "simulate-check")  # run again every time: never the cache's real runs
    tasks = [(row, seed, overrides(row, seed, a), runs.run_dir(root, overrides(row, seed, a), kind="real"))
             for row in names for seed in seeds_of.get(row, a.seeds)]
    threads = a.sim_threads or simulate.rank_threads(a.nproc)
    results = simulate.checked(tasks, root) if a.report else simulate.check(tasks, root, threads)
    table = simulate.check_table(results, a.nproc, a.steps, threads)
    print(table)
    tag = a.tag or "simulate"
    os.makedirs(OUT, exist_ok=True)
    manifest.write(os.path.join(OUT, f"{tag}.json"), {"args": vars(a), "results": results}, "bench/quality.py", argv)
    manifest.write(os.path.join(OUT, f"{tag}.md"), table + "\n", "bench/quality.py", argv)
    return 0


def add_k(tags: list[str], argv) -> int:
    """--add-k: each committed table ``<tag>.md`` redrawn with the column k (harness/steps_trend.py)
    from ``<tag>.json``'s seed-0 val losses and dense's seed-0 WSD curve (steps_trend.json); no runs.
    Tables of another rank count than the curve's 4 are refused (their dense is another)."""
    from .steps_trend import dense_curve, with_k

    curve = dense_curve()
    if not curve:
        print("--add-k: no dense curve yet (bench/results/quality/steps_trend.json: "
              "python bench/time_to_target.py --trend)", file=sys.stderr)
        return 2
    with open(os.path.join(OUT, manifest.NAME)) as fh:
        old = json.load(fh)
    for tag in tags:
        with open(os.path.join(OUT, f"{tag}.json")) as fh:
            doc = json.load(fh)
        if doc["args"].get("nproc") != 4:
            print(f"--add-k: {tag}: dist.nproc={doc['args'].get('nproc')}, dense's curve is 4 ranks'", file=sys.stderr)
            return 2
        with open(os.path.join(OUT, f"{tag}.md")) as fh:
            md = fh.read()
        was = old.get(f"{tag}.md", {})
        note = was.get("note") if "--add-k" in was.get("command", "") else (  # redrawn again: the same source
            f"column k added to the table measured by `{was.get('command')}` at {was.get('commit', '?')[:10]} "
            f"({tag}.json); dense's curve: steps_trend.json")
        manifest.write(os.path.join(OUT, f"{tag}.md"), with_k(md, doc["results"], doc["args"]["steps"], curve),
                       "bench/quality.py", argv, note=note)
    return 0


def main(argv=None) -> int:
    global RUNS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="goals", help="goals | sweep | a comma-separated list of row names")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lrs", type=float, nargs="*", default=[],
                    help="an LR sweep on the first seed; the other seeds run at each row's best LR "
                         "(rows in ROW_LRS sweep their own grid instead)")
    ap.add_argument("--row-lrs", type=float, nargs="*", default=None,
                    help="a (smaller) grid for the rows that have their own (ROW_LRS) in this call")
    ap.add_argument("--report", action="store_true", help="only tabulate the cached runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each is dist.nproc processes); no --lrs")
    ap.add_argument("--launch", nargs="*", default=[], help="overrides for how runs are launched, not part of a "
                                                            "run's identity (e.g. dist.threads=1 dist.backend=gloo)")
    ap.add_argument("--deadline", type=float, default=math.inf, help="seconds from now after which no run starts")
    ap.add_argument("--runs-dir", default=RUNS, help="where the runs are cached")
    ap.add_argument("--tag", default=None, help="name of the table files (default: the set's name, or 'custom')")
    ap.add_argument("--simulate", action="store_true", help="run each row's dist.nproc ranks as threads of this "
                    "process, collectives computed in-process (harness/simulate.py); cached apart from real runs")
    ap.add_argument("--simulate-check", action="store_true", help="run every row both ways now (real, then "
                    "simulated), timed; table of val loss differences and speed ratios (<tag>.md; with --report: "
                    "from the runs already made)")
    ap.add_argument("--sim-threads", type=int, default=0, help="the simulator's intra-op threads (0: a real "
                    "rank's, cores // nproc, at least 1: bitwise as the real path; more threads change the sums' order)")
    ap.add_argument("--add-k", nargs="+", metavar="TAG", default=None, help="redraw the committed tables <TAG>.md "
                    "with the column k (steps to dense's loss, harness/steps_trend.py) from <TAG>.json; no runs")
    a = ap.parse_args(argv)
    if a.add_k:
        return add_k(a.add_k, argv)
    RUNS = a.runs_dir
    SIMULATE[:] = [a.simulate, a.sim_threads]
    runs.EXTRA[:] = a.launch
    DEADLINE[0] = time.monotonic() + a.deadline
    names = SETS.get(a.rows) or [r.strip() for r in a.rows.split(",")]
    seeds_of = {}  # "row@0+1": that row on seeds 0 and 1 only
    for i, n in enumerate(names):
        if "@" in n:
            names[i], sel = n.split("@")
            seeds_of[names[i]] = [int(x) for x in sel.split("+")]
    asked = list(names)
    names = ["dense", *[n for n in names if n != "dense"]]
    for n in names:
        if n not in ROWS:
            raise SystemExit(f"--rows: unknown row or set {n!r} (sets: {', '.join(SETS)}; rows: the catalogue's, "
                             "bench/harness/catalogue.py)")
        if n in PEER_ROWS:
            raise SystemExit(f"--rows: {n!r} is torch's peer: bench/time_to_target.py and bench/cluster.py run it")
    if a.simulate or a.simulate_check:
        from . import simulate

        if a.jobs > 1:  # one simulation at a time per process (harness/simulate.py)
            print(f"--jobs={a.jobs}: --simulate runs one row at a time (--jobs 1)", file=sys.stderr)
            return 2

        for n in names:
            why = simulate.refusal_of(overrides(n, a.seeds[0], a))
            if why:
                print(f"{why} (row {n!r})", file=sys.stderr)
                return 2
    if a.simulate_check:
        return simulate_check(asked, seeds_of, a, argv)
    results: dict = {}
    best_lr: dict = {}
    tasks = []
    for row in names:
        if a.lrs:  # the same sweep for every row, on the first seed: each row keeps its best LR
            sweep = {}
            grid = ROW_LRS.get(row, a.lrs) if a.row_lrs is None or row not in ROW_LRS else a.row_lrs
            for lr in grid:
                rows = rows_of(run_dir(overrides(row, a.seeds[0], argparse.Namespace(**{**vars(a), "lr": lr})))) \
                    if a.report else run(row, a.seeds[0], argparse.Namespace(**{**vars(a), "lr": lr}))
                if rows and rows[-1]["step"] == a.steps:
                    sweep[lr] = rows[-1]["val_loss"]
            if sweep:
                best_lr[row] = {"best": min(sweep, key=sweep.get), "sweep": sweep}
        row_args = argparse.Namespace(**{**vars(a), "lr": best_lr.get(row, {}).get("best", a.lr)})
        tasks += [(row, seed, row_args) for seed in seeds_of.get(row, a.seeds)]

    def one(task):
        row, seed, row_args = task
        return rows_of(run_dir(overrides(row, seed, row_args))) if a.report else run(row, seed, row_args)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for (row, seed, row_args), rows in zip(tasks, pool.map(one, tasks)):
            if rows and rows[-1]["step"] == a.steps and "val_loss" in rows[-1]:
                results.setdefault(row, {})[seed] = {**summary(rows, a.nproc), "lr": row_args.lr}
    from .steps_trend import dense_curve, with_k

    table = with_k(report(results, a), results, a.steps, dense_curve()) if a.nproc == 4 else report(results, a)
    if best_lr:
        table += "\n\nLR sweep (first seed, val loss): " + "; ".join(
            f"{row}: " + ", ".join(f"{lr:g} {v:.4f}" for lr, v in b["sweep"].items()) + f" (best {b['best']:g})"
            for row, b in best_lr.items())
    print(table)
    os.makedirs(OUT, exist_ok=True)
    tag = a.tag or (a.rows if a.rows in SETS else "custom")
    manifest.write(os.path.join(OUT, f"{tag}.json"), {"args": vars(a), "results": results, "lr_sweep": best_lr},
                   "bench/quality.py", argv)
    manifest.write(os.path.join(OUT, f"{tag}.md"), table + "\n", "bench/quality.py", argv)
    try:
        plot(results, os.path.join(OUT, f"{tag}.png"))
        manifest.record([os.path.join(OUT, f"{tag}.png")], "bench/quality.py", argv)
    except ImportError:
        pass
    return 0

