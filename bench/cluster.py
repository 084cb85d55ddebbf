"""thinwire against DDP and its peers on a bandwidth-shaped cluster simulated on one machine.

Every row runs with one rank per network namespace (launch/netsim: a bridge, tc tbf on
both ends of every link, torchrun with c10d rendezvous) through bench/cluster_peer.py,
which drives thinwire's own Trainer (same model, data, AdamW plugin, schedule, step,
evaluation and metrics keys for every row) and, for the peer rows, swaps thinwire's comm
hook for torch's (fp16 compress hook, PowerSGD, PostLocalSGDOptimizer). DeepSpeed ZeRO-2
with bf16 communication is thinwire's ``engine=deepspeed``.

Per rate:
  1. DDP fp32 runs S steps ("dense's steps"); its val loss at step S is the target.
  2. Every other row runs until it reaches the target at an evaluation at or after step S,
     or 3S steps, or the wall-time budget (training step time, the same for every row,
     DDP fp32 included), whichever comes first. All rows share one LR schedule: cosine
     over 3S steps (so stopping at S or at the target does not change the schedule).
  3. Reported per row: steps to target (the first evaluation at or below the target),
     throughput on this machine (tokens/s over all ranks, steps after the first 10%; not a
     speed claim), val loss at step S (equal steps),
     accounted wire bytes per training step (thinwire's ``wire_bytes``: data + control this
     rank sends; for the torch peers the documented formula in bench/cluster_peer.py),
     and measured bytes: each rank reads its own eth0 tx_bytes before its first step and
     at the end (after a barrier, so set-up traffic is excluded), and the check is
     measured / accounted over the same window (training steps + evaluations), per rank.

    sudo python bench/cluster.py --quick        # the network clock: 5 validation rows + projections, < 10 min
    sudo python bench/cluster.py --quick --matrix   # 2 ranks, 100 Mbit/s, 6 rows of the matrix below
    sudo python bench/cluster.py                # 4 ranks, 100 Mbit/s + 1 Gbit/s, 14 rows, S=160, 135 s (~1 h),
                                                # then the clock's full validation and projection

Wall-clock speed-ups between rows are not reported: 4 ranks on 2 shared cores measure the
machine's load as much as the method. What the matrix reports is bytes (accounted and
measured) and quality (steps to the target, val loss at equal steps); time to quality at the
scale users run comes from the network clock (bench/netclock.py, docs/cluster.md).

Needs root and network namespaces (launch/netsim check); exits 0 with a message otherwise.
Writes bench/results/cluster.{json,md} and cluster_<rate>.png (cluster_quick.* with --quick;
--out to change the stem; --report redraws the table and plots from the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from harness import manifest
from harness.catalogue import peer_args, spelt
from harness.tables import failed_rows, md_row

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NETSIM = os.path.join(ROOT, "launch", "netsim")
PEER = os.path.join(HERE, "cluster_peer.py")

def _row(label: str, group: str, row: str) -> tuple:
    return label, group, peer_args(row), spelt(row)


# label, group, peer args, thinwire overrides: the catalogue's rows (harness/catalogue.py)
DENSE = _row("ddp fp32", "baseline", "dense")
BF16 = _row("thinwire comm=bf16", "thinwire", "bf16")
ROWS = [
    DENSE,
    *[_row(r, "peer", r) for r in ("torch fp16 hook", "torch PowerSGD r2", "torch PowerSGD r4",
                                   "torch PostLocalSGD H=8", "DeepSpeed ZeRO-2 bf16")],
    BF16,
    *[_row(f"thinwire {r}", "thinwire", r) for r in ("topk 1% + ef", "topk 1% + ef21", "topk 1% + econtrol",
                                                     "int8 two-phase + ef", "sign1 + ef", "co2 H=8", "co2 H=8 + int8")],
    # reference for "communication hidden": local steps that never synchronise (evaluation
    # still averages the ranks' parameters)
    _row("compute only (no sync)", "reference", "compute only (no sync)"),
]
FULL_LABELS = [r[0] for r in ROWS if r[1] != "reference"]
QUICK_LABELS = ["ddp fp32", "thinwire comm=bf16", "thinwire topk 1% + ef", "thinwire co2 H=8", "torch PowerSGD r2",
                "compute only (no sync)"]
# a small per-rank batch (8 sequences of 32 characters) on the default char-GPT (4 layers,
# d=128, 0.8 M params): one step's compute is well below one dense fp32 all-reduce at
# 100 Mbit/s on this 2-core machine (the regime the benchmark is about)
MODEL = ["data.batch_size=8", "model.block_size=32"]
EVAL_EVERY = 8  # a multiple of H=8: co2 and PostLocalSGD are evaluated right after an average


def netsim_run(hosts: int, rate: str, row: tuple, horizon: int, stop_steps: int, min_steps: int,
               target: float | None, budget: float, workdir: str, tag: str, threads: int) -> dict:
    label, _group, peer_args, overrides = row
    run_dir = os.path.join(workdir, tag)
    stats = os.path.join(workdir, f"{tag}.net.json")
    env = {**os.environ, "PYTHON": sys.executable, "NETSIM_PREFIX": "twc", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": str(threads)}
    cmd = ["bash", NETSIM, "run", str(hosts), rate, "--stats", stats, "--", PEER, *peer_args,
           "--stop-steps", str(stop_steps), "--min-steps", str(min_steps), "--budget-s", str(budget),
           "--eval-every", str(EVAL_EVERY), "--out", run_dir,
           *(["--target", repr(target)] if target is not None else []), "--",
           f"trainer.max_steps={horizon}", "trainer.sample_chars=0", "trainer.progress=false",
           "logger=none", "dist.backend=gloo", f"dist.threads={threads}", *overrides, *MODEL]
    t0 = time.perf_counter()
    with open(os.path.join(workdir, f"{tag}.log"), "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=workdir,
                           timeout=budget + 600)
    if p.returncode != 0:
        with open(os.path.join(workdir, f"{tag}.log")) as fh:
            raise RuntimeError(f"{label} failed (rc {p.returncode}):\n{fh.read()[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    ranks = [json.load(open(os.path.join(run_dir, f"rank{r}.json"))) for r in range(hosts)]
    with open(stats) as fh:
        net = json.load(fh)
    return {"lines": lines, "ranks": ranks, "net": net, "wall_s": time.perf_counter() - t0,
            "cmd": " ".join(cmd[cmd.index(PEER):]).replace(ROOT + "/", "")}


def summarise(row: tuple, run: dict, hosts: int, dense_steps: int) -> dict:
    label, group, peer_args, overrides = row
    lines = run["lines"]
    if not any("val_loss" in r for r in lines):
        raise ValueError(f"stopped ({run['ranks'][0]['stop']}) at step {lines[-1]['step'] if lines else 0} "
                         f"before any evaluation")
    t, cum, curve = 0.0, 0, []
    for r in lines:
        t += r["step_time_s"]
        cum += r["wire_bytes"]
        if "val_loss" in r:
            curve.append({"step": r["step"], "train_s": round(t, 3), "val_loss": round(r["val_loss"], 5),
                          "wire_bytes_cum": cum})
    steps = lines[-1]["step"]
    steady = lines[max(1, len(lines) // 10):]
    unit = next(k for k in lines[0] if k.endswith("_per_s"))
    items = sum(r[unit] * r["step_time_s"] for r in steady)
    st = sum(r["step_time_s"] for r in steady)
    per_rank = []
    for rk in run["ranks"]:
        acc = rk["accounted"]["train"] + rk["accounted"]["eval"]
        mea = rk["measured"]["train"] + rk["measured"]["eval"]
        per_rank.append({"rank": rk["rank"], "accounted": acc, "measured": mea,
                         "ratio": round(mea / acc, 4) if acc else None})
    acc_all = sum(r["accounted"] for r in per_rank)
    mea_all = sum(r["measured"] for r in per_rank)
    ratios = [r["ratio"] for r in per_rank if r["ratio"] is not None]
    at_s = next((c for c in curve if c["step"] == dense_steps), None)
    r0 = run["ranks"][0]
    return {
        "label": label, "group": group, "peer_args": peer_args, "overrides": overrides, "command": run["cmd"],
        "steps": steps, "stop": r0["stop"], "train_s": round(t, 2), "run_wall_s": round(run["wall_s"], 1),
        unit: round(items / st, 1), "s_per_step": round(st / len(steady), 4),
        "comm_wait_s_per_step": round(sum(r.get("comm_wait_s", 0.0) for r in steady) / len(steady), 4),
        "val_at_dense_steps": at_s["val_loss"] if at_s else None,
        "final_val_loss": curve[-1]["val_loss"], "curve": curve,
        "accounted_train_B_per_step": round(r0["accounted"]["train"] / steps),
        "accounted_B_per_step": round(acc_all / (hosts * steps)),
        "measured_B_per_step": round(mea_all / (hosts * steps)),
        "measured_over_accounted": round(mea_all / acc_all, 4) if acc_all else None,
        "measured_over_accounted_per_rank": ratios,
        "agree_10pct": bool(ratios) and all(abs(x - 1) <= 0.10 for x in ratios),
        "dense_B_per_step": lines[-1]["dense_bytes"],
        "netsim_total_tx_bytes": run["net"]["total_tx_bytes"],
    }


def time_to(curve: list[dict], target: float) -> tuple[float | None, int | None]:
    for c in curve:
        if c["val_loss"] <= target:
            return c["train_s"], c["step"]
    return None, None


def markdown(res: dict) -> str:
    rows = res["rows"]
    by = {r["label"]: r for r in rows}
    dense = by["ddp fp32"]
    out = [f"### {res['rate']}: {res['hosts']} ranks, dense's steps S = {res['dense_steps']}, "
           f"budget {res['budget_s']:.0f} s of training step time per row",
           "",
           f"Target val loss {res['target']:.4f} (DDP fp32 at step {res['dense_steps']}); other rows run "
           f"until the target (at or after step S), 3S = {3 * res['dense_steps']} steps, or the budget; "
           f"cosine LR over {3 * res['dense_steps']} steps for every row; eval every {EVAL_EVERY} steps.",
           "",
           "| row | steps to target | tokens/s (this machine) | s/step (comm wait) | "
           f"val loss @ step {res['dense_steps']} | steps run (stop) | accounted train B/step | "
           "measured B/step | accounted B/step | measured/accounted (worst rank) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tt = r["time_to_target_s"]
        tt_s = f"{r['step_to_target']}" if tt is not None else "not reached"
        unit = next(k for k in r if k.endswith("_per_s") and k != "comm_wait_s_per_step")
        v = r["val_at_dense_steps"]
        v_s = f"{v:.4f} ({(v / dense['val_at_dense_steps'] - 1) * 100:+.1f}%)" if v is not None else \
            f"- (last: {r['final_val_loss']:.4f} @ {r['steps']})"
        worst = max(r["measured_over_accounted_per_rank"], key=lambda x: abs(x - 1))
        out.append(md_row(r["label"], tt_s, f"{r[unit]:.0f}",
                          f"{r['s_per_step']:.3f} ({r['comm_wait_s_per_step']:.3f})", v_s, f"{r['steps']} ({r['stop']})", f"{r['accounted_train_B_per_step']:,}",
                          f"{r['measured_B_per_step']:,}", f"{r['accounted_B_per_step']:,}",
                          f"{r['measured_over_accounted']:.3f} ({worst:.3f})"))
    out += failed_rows(res.get("failed", []), 10, 200, last_line=True)
    return "\n".join(out) + "\n"


def headline(res: dict) -> dict:
    """The issue's byte and equal-step quality numbers at this rate, computed from the table
    (no wall-clock speed-ups: docs/cluster.md)."""
    rows = res["rows"]
    by = {r["label"]: r for r in rows}
    bf16 = by.get(BF16[0])
    h = {}
    if bf16:
        b = bf16["accounted_train_B_per_step"]
        h["bytes_vs_bf16"] = {r["label"]: round(r["accounted_train_B_per_step"] / b, 4) for r in rows}
    dv = by["ddp fp32"]["val_at_dense_steps"]
    h["val_vs_dense_at_S"] = {r["label"]: (round(r["val_at_dense_steps"] / dv - 1, 4)
                                           if r["val_at_dense_steps"] is not None else None) for r in rows}
    return h


def goals_md(res: dict) -> str:
    """The issue's goals checked against this rate's table (computed, not typed in)."""
    h = headline(res)
    ok = {True: "met", False: "**missed**"}
    out = [f"Goals at {res['rate']} ({res['hosts']} ranks):", ""]
    # no wall-clock speed-up goals: 4 ranks on 2 shared cores measure the machine's load as much
    # as the method (docs/cluster.md); time to quality is projected by bench/netclock.py
    bv = h.get("bytes_vs_bf16", {})
    for label, bound, what in (("thinwire topk 1% + ef", 1 / 16, "<= 1/16 of bf16"),
                               ("thinwire int8 two-phase + ef", 0.55, "<= 0.55x bf16")):
        if label in bv:
            out.append(f"- {label}: accounted bytes per training step = {bv[label]:.4f}x bf16's "
                       f"(1/{1 / bv[label]:.1f}); goal {what}: {ok[bv[label] <= bound]}")
    vv = h["val_vs_dense_at_S"]
    for label, bound in (("thinwire int8 two-phase + ef", 0.02), ("thinwire co2 H=8", 0.02),
                         ("thinwire co2 H=8 + int8", 0.02), ("thinwire topk 1% + ef", 0.03),
                         ("thinwire topk 1% + ef21", 0.03), ("thinwire topk 1% + econtrol", 0.03)):
        if label in vv:
            v = vv[label]
            out.append(f"- {label}: val loss at step {res['dense_steps']} "
                       + (f"{v * 100:+.1f}% vs DDP fp32; goal within {bound * 100:.0f}%: {ok[v <= bound]}"
                          if v is not None else "not measured (stopped before that step)"))
    return "\n".join(out) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    cmap = plt.get_cmap("tab10")
    k = {"peer": 0, "thinwire": 0, "reference": 7}
    for r in res["rows"]:
        xs = [c["train_s"] for c in r["curve"]]
        ys = [c["val_loss"] for c in r["curve"]]
        wb = [c["wire_bytes_cum"] / 1e6 for c in r["curve"]]
        style = {"thinwire": "-", "peer": "--", "reference": ":"}.get(r["group"], "-")
        lw = 2.2 if r["group"] == "baseline" else 1.3
        if r["group"] == "baseline":
            color = "black"
        else:
            color = cmap(k[r["group"]] % 10)
            k[r["group"]] += 1
        a1.plot(xs, ys, style, color=color, lw=lw, label=r["label"])
        a2.plot(wb, ys, style, color=color, lw=lw, label=r["label"])
    for a in (a1, a2):
        a.axhline(res["target"], color="gray", lw=0.8, ls=":")
        a.set_ylabel("val loss")
        a.grid(alpha=0.3)
    a1.set_xlabel("training step time (s, cumulative; start-up and evaluation excluded)")
    a2.set_xlabel("wire bytes sent per rank (MB, cumulative, accounted; log scale)")
    a2.set_xscale("log")
    a1.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['hosts']} ranks at {res['rate']} (tc tbf), char-GPT 0.8M params; "
                 f"target {res['target']:.3f} = DDP fp32 at step {res['dense_steps']} (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_rate(values: str, rates: list[str], cast) -> dict:
    vals = [cast(v) for v in str(values).split(",")]
    if len(vals) == 1:
        vals *= len(rates)
    if len(vals) != len(rates):
        raise SystemExit(f"bench/cluster.py: {values!r}: give one value or one per rate")
    return dict(zip(rates, vals))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the network clock only: its validation on 5 rows "
                    "(2 hosts, 10 Mbit/s, 24 steps) and the user-scale projection (< 10 minutes)")
    ap.add_argument("--matrix", action="store_true", help="with --quick: the old quick matrix instead "
                    "(2 ranks, 100mbit, 6 rows)")
    ap.add_argument("--no-clock", action="store_true", help="without --quick: the matrix only")
    ap.add_argument("--rates", default=None, help="comma-separated tbf rates (default 100mbit,1gbit)")
    ap.add_argument("--ranks", type=int, default=None, help="default 4 (2 with --quick)")
    ap.add_argument("--steps", default=None, help="dense's steps S, one or one per rate (multiple of 8)")
    ap.add_argument("--budget", default=None, help="training-time budget per row in s, one or one per rate")
    ap.add_argument("--rows", default=None, help="comma-separated row labels (default: all, or the quick set)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=None, help="output stem (default bench/results/cluster, "
                    "bench/results/cluster_quick with --quick)")
    ap.add_argument("--report", action="store_true", help="only rewrite <out>.md and the plots from <out>.json")
    a = ap.parse_args()
    a.out = a.out or os.path.join(HERE, "results", "cluster_quick" if a.quick else "cluster")
    if a.report:
        with open(a.out + ".json") as fh:
            write_report(json.load(fh), a.out, redraw=True)
        return 0

    if a.quick and not a.matrix:
        return clock(quick=True)
    chk = subprocess.run(["bash", NETSIM, "check"], capture_output=True, text=True)
    if chk.stdout.strip() != "ok":
        print(f"bench/cluster.py: launch/netsim {chk.stdout.strip() or chk.stderr.strip()}; nothing measured")
        return 0
    rates = (a.rates or ("100mbit" if a.quick else "100mbit,1gbit")).split(",")
    hosts = a.ranks or (2 if a.quick else 4)
    steps = per_rate(a.steps or ("96" if a.quick else "160"), rates, int)
    budget = per_rate(a.budget or ("40" if a.quick else "135"), rates, float)
    if any(s % EVAL_EVERY for s in steps.values()):
        ap.error(f"--steps must be multiples of {EVAL_EVERY}")
    labels = a.rows.split(",") if a.rows else (QUICK_LABELS if a.quick else FULL_LABELS)
    rows_def = [r for r in ROWS if r[0] in labels]
    if not rows_def or rows_def[0] is not DENSE:
        ap.error("the rows must include 'ddp fp32' (the target comes from it)")
    results = []
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="twcluster")
    print(f"bench/cluster.py: work dir {work}", flush=True)
    for rate in rates:
        S, B = steps[rate], budget[rate]
        res = {"rate": rate, "hosts": hosts, "dense_steps": S, "budget_s": B, "eval_every": EVAL_EVERY,
               "target": None, "rows": [], "failed": [], "complete": False}
        results.append(res)
        for i, row in enumerate(rows_def):
            dense = row is DENSE
            try:
                run = netsim_run(hosts, rate, row, 3 * S, S if dense else 3 * S, S,
                                 None if dense else res["target"], B, work, f"{rate}-r{i}", a.threads)
                r = summarise(row, run, hosts, S)
            except (RuntimeError, OSError, ValueError, KeyError, StopIteration, IndexError,
                    subprocess.TimeoutExpired) as e:
                if dense:
                    raise
                res["failed"].append({"label": row[0], "error": str(e)[-1500:]})
                print(f"[{rate}] {row[0]}: FAILED: {str(e)[-600:]}", flush=True)
                continue
            if dense:
                res["target"] = r["final_val_loss"]
            r["time_to_target_s"], r["step_to_target"] = time_to(r["curve"], res["target"])
            res["rows"].append(r)
            print(f"[{rate}] {r['label']}: {r['steps']} steps ({r['stop']}), {r['s_per_step']:.3f} s/step, "
                  f"val@S {r['val_at_dense_steps']}, to target {r['time_to_target_s']} s, accounted "
                  f"{r['accounted_train_B_per_step']:,} B/step, measured/accounted {r['measured_over_accounted']} "
                  f"{r['measured_over_accounted_per_rank']} ({time.perf_counter() - t_start:.0f} s so far)",
                  flush=True)
            res["headline"] = headline(res)
            doc = document(a, results, t_start)  # partial results survive an interruption
            manifest.write(a.out + ".json", doc, command=doc["command"])
        res["complete"] = True
    write_report(document(a, results, t_start), a.out)
    return 0 if a.quick or a.no_clock else clock(quick=False)


def clock(quick: bool) -> int:
    """The network clock (bench/netclock.py): validated against the shaped network, then
    projected to the user-scale presets. Quick: 5 rows of 24 steps (validation skips cleanly
    without root)."""
    import netclock
    from harness import netclock_validate

    rc = netclock_validate.main(["--rows", "ddp fp32,bf16,topk 1% + ef (all-gather),local H=8,co2 H=8",
                                 "--steps", "24", "--out", netclock_validate.OUT + "_quick"] if quick else [])
    return rc or netclock.main([])


def document(a, results: list, t_start: float) -> dict:
    return {"command": " ".join(["python", "bench/cluster.py", *sys.argv[1:]]), "overrides_all_rows": MODEL,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads/rank {a.threads}",
           "total_s": round(time.perf_counter() - t_start, 1), "results": results}


def write_report(doc: dict, out: str, redraw: bool = False) -> None:
    """``<out>.json`` (unless ``redraw``: only the table and plots, from it), ``<out>.md`` and the
    plots, with their manifests."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if not redraw:
        manifest.write(out + ".json", doc, command=doc["command"])
    how = {"command": "python bench/cluster.py --report",
           "note": f"redrawn from {os.path.basename(out)}.json, measured by `{doc['command']}`"} if redraw else \
        {"command": doc["command"]}
    md = [f"`{doc['command']}` ({doc['date']}, {doc['machine']}, {doc['total_s']:.0f} s in all)", "",
          f"Overrides on every row: `{' '.join(MODEL)}` (char-GPT 4 layers, d=128, 0.8 M params, "
          "AdamW 3e-3). Budgets were chosen so the whole matrix fits its time slot on this machine.", ""]
    for res in doc["results"]:
        md.append(markdown(res))
        md.append(goals_md(res))
        if not res.get("complete", True):
            md.append(f"(partial: {len(res['rows'])} rows measured so far)\n")
        png = f"{out}_{res['rate']}.png"
        plot(res, png)
        md.append(f"![val loss vs time and bytes at {res['rate']}]({os.path.basename(png)})\n")
    manifest.write(out + ".md", "\n".join(md), **how)
    manifest.record([f"{out}_{res['rate']}.png" for res in doc["results"]], **how)
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
