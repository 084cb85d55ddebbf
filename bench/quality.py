"""The shared quality harness: val loss vs dense at equal steps, paired seeds, and bytes per
parameter per inner step, on the cluster benchmark's 0.8M char-GPT.

    python bench/quality.py                       # the goal rows, 3 seeds, 4 ranks, 1200 steps
    python bench/quality.py --rows sweep --seeds 0
    python bench/quality.py --report              # tables from the cached runs only

Every row runs ``thinwire-train`` with the same model (n_layer 4, n_embd 128, block 32, batch 8
per rank), data order, schedule (AdamW, cosine, ``--lr``) and 64 fixed eval batches; seeds are
paired (a method and dense share seed, init and data order) and each method is reported as the
mean and spread of its per-seed difference to dense. A run is cached under
``bench/results/quality/runs/<hash of its overrides>/`` and reused when complete, so dense
baselines run once. Bytes are the accounted per-rank ``wire_bytes`` (evaluation traffic is
``eval_bytes`` and not counted), as B/param/step and as a ratio to a bf16 ring all-reduce of
the same model at the same p (2 (p-1)/p x 2 B/param); payload B/param/step (the papers'
basis) comes from the comm layer's compression ratio: 4 / ratio / H. Runs end on a completed
outer step (``max_steps`` is a multiple of every H used: 8, 15, 30).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "results", "quality")
MODEL = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=32",
         "data.batch_size=8", "data.eval_batches=64"]
LOCAL = ["sync.clip=inf"]  # no row clips its pseudo-gradient (SparseLoCo and DiLoCo do not)
CO2_RECIPE = ["sync.outer_optim.lr=1.0", "sync.outer_optim.momentum=0.5"]    # CO2's outer Nesterov 0.5, lr 1
DILOCO_RECIPE = ["sync.outer_optim.lr=0.7", "sync.outer_optim.momentum=0.9"]  # DiLoCo's Nesterov 0.9, lr 0.7
AVG_RECIPE = ["sync.outer_optim.lr=1.0", "sync.outer_optim.momentum=0.0",  # local's: lr 1, no momentum
              "sync.outer_optim.nesterov=false"]
ROWS = {
    "dense": ["comm=none", "sync=ddp"],
    "bf16": ["comm=bf16", "sync=ddp"],
    "local H=15": ["sync=local", "sync.local_steps=15", *LOCAL],
    "diloco H=15": ["sync=diloco", "sync.local_steps=15", *LOCAL],
    "sparseloco H=15": ["experiment=sparseloco"],
    "local H=8": ["sync=local", "sync.local_steps=8", *LOCAL],
    "diloco H=30": ["sync=diloco", "sync.local_steps=30", *LOCAL],
    "sparseloco H=8": ["experiment=sparseloco", "sync.local_steps=8"],
    "sparseloco H=30": ["experiment=sparseloco", "sync.local_steps=30"],
    "sparseloco H=15 k=128": ["experiment=sparseloco", "comm.k=128"],
    "co2 H=8": ["sync=co2", "sync.local_steps=8"],
    "local H=8 + topk 1% + ef": ["sync=local", "sync.local_steps=8", *LOCAL, "comm=topk", "comm.ratio=0.01"],
    # DeMo / DisTrO (optim=demo): every step, compressed momentum, Signum step; own LR grid (ROW_LRS)
    "demo k=32 bf16": ["optim=demo"],
    "demo 1-bit k=16": ["optim=demo", "optim.k=16", "optim.bits=1"],
    "distro 1-bit k=4": ["optim=distro"],
    "demo v2 k=32 bf16 (AdamW on U)": ["optim=demo", "optim.update_rule=adamw"],
    # issue 16 (overlap without the staleness cost; docs/sync.md "Overlap"): local/streaming rows keep
    # local's recipe (outer SGD lr 1, no momentum); eager rows spell their outer recipe (the
    # unnamed ones: the shipped default, local's recipe)
    "local H=30": ["sync=local", "sync.local_steps=30", *LOCAL],
    "local H=8 diloco-recipe": ["sync=diloco", "sync.local_steps=8", *LOCAL],
    "eager H=8 co2-recipe": ["sync=co2", "sync.overlap=eager", "sync.local_steps=8", *CO2_RECIPE],
    "eager H=8 diloco-recipe": ["sync=co2", "sync.overlap=eager", "sync.local_steps=8", *DILOCO_RECIPE],
    "eager H=30 diloco-recipe": ["sync=co2", "sync.overlap=eager", "sync.local_steps=30", *DILOCO_RECIPE],
    "eager H=30 co2-recipe": ["sync=co2", "sync.overlap=eager", "sync.local_steps=30", *CO2_RECIPE],
    # DES-LOC-style inner-moment averaging (sync.moment1_every / moment2_every, in rounds)
    "local H=30 + moments 1/2": ["sync=local", "sync.local_steps=30", *LOCAL, "sync.moment1_every=1",
                                 "sync.moment2_every=2"],
    "eager H=8": ["sync=co2", "sync.overlap=eager", "sync.local_steps=8", *AVG_RECIPE],
    "eager H=30": ["sync=co2", "sync.overlap=eager", "sync.local_steps=30", *AVG_RECIPE],
    **{f"stream H={h} F={f} tau={t}": ["sync=local", f"sync.local_steps={h}", f"sync.fragments={f}",
                                        f"sync.fragment_delay={t}", "sync.fragment_alpha=0.5", *LOCAL]
       for h, f, t in ((8, 2, 1), (8, 2, 3), (8, 4, 1), (30, 2, 1), (30, 2, 14), (30, 3, 1), (30, 3, 9))},
    # MT-DAO (optim=mtdao, thinwire/optim/mtdao.py): AdamW's step with a slow first moment (beta_slow)
    # mixed with the raw gradient (omega), the slow momentum averaged every round (sync.moment1_every=1);
    # rows without "b2=" keep AdamW's beta2 0.95 (measured first; optim=mtdao's default is now 0.999)
    **{f"mtdao H={h} b={b} w={w}{'' if b2 == 0.95 else f' b2={b2}'}{' no-avg' if not m else ''}": [
        "sync=local", f"sync.local_steps={h}", *LOCAL, "optim=mtdao", f"optim.beta_slow={b}", f"optim.omega={w}",
        f"sync.moment1_every={m}", f"optim.beta2={b2}"]
       for h, b, w, m, b2 in ((8, 0.99, 0.7, 1, 0.95), (8, 0.995, 0.7, 1, 0.95), (8, 0.999, 0.7, 1, 0.95),
                              (8, 0.99, 0.5, 1, 0.95), (8, 0.99, 0.9, 1, 0.95), (8, 0.99, 0.7, 0, 0.95),
                              (30, 0.995, 0.7, 1, 0.95), (30, 0.999, 0.7, 1, 0.95),
                              (8, 0.99, 0.7, 1, 0.999), (8, 0.995, 0.7, 1, 0.999), (8, 0.99, 0.5, 1, 0.999),
                              (30, 0.995, 0.7, 1, 0.999))},
    **{f"mtdao dense b={b} w=0.7{'' if b2 == 0.95 else f' b2={b2}'}": [
        "comm=none", "sync=ddp", "optim=mtdao", f"optim.beta_slow={b}", "optim.omega=0.7", f"optim.beta2={b2}"]
       for b, b2 in ((0.99, 0.95), (0.99, 0.999))},
    "adamw dense b2=0.999": ["comm=none", "sync=ddp", "optim.betas=[0.9,0.999]"],
    "local H=8 b2=0.999": ["sync=local", "sync.local_steps=8", *LOCAL, "optim.betas=[0.9,0.999]"],
    "local H=8 + moment1": ["sync=local", "sync.local_steps=8", *LOCAL, "sync.moment1_every=1"],  # AdamW, DES-LOC K_u=1
    # SGD with momentum 0.9 (issue 23 item 3): dense, Top-K 1% + classic EF, Top-K 1% + DGC's
    # momentum correction (the momentum moves from the optimizer into comm.feedback=dgc)
    "sgd m=0.9 dense": ["optim=sgd", "optim.momentum=0.9"],
    "sgd m=0.9 + topk 1% + ef": ["optim=sgd", "optim.momentum=0.9", "comm=topk", "comm.ratio=0.01", "comm.feedback=ef"],
    "sgd + topk 1% + dgc m=0.9": ["optim=sgd", "optim.momentum=0", "comm=topk", "comm.ratio=0.01", "comm.feedback=dgc",
                                  "comm.momentum=0.9"],
    "sgd + topk 1% + dgc m=0.9 warm-up 120": ["optim=sgd", "optim.momentum=0", "comm=topk", "comm.ratio=0.01",
                                              "comm.feedback=dgc", "comm.momentum=0.9", "comm.sparsity_warmup=120"],
    # 1-bit Adam (optim=adam1bit): AdamW on bf16-all-reduced gradients for 48 steps (4%), then the
    # variance frozen and the momentum averaged as scaled signs with worker + server error feedback
    # (decay and LR warm-up spelt out: configs/optim/adam1bit.yaml's, whichever configs/ is installed)
    "adam1bit sign freeze=48": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20"],
    "adam1bit sign freeze=45": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                "optim.freeze_step=45"],   # 3.75% of 1200: <= 1/10 of bf16 over the run
    # 0/1 Adam's variance refreshes (optim.var_update_scaler = kappa): 24 dense steps, then dense
    # refreshes at intervals 2, 4, 8, ... (kappa each): 46 dense steps in 1200, <= 1/10 of bf16
    "adam1bit sign freeze=24 refresh kappa=3": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                                "optim.freeze_step=24", "optim.var_update_scaler=3"],
    # 0/1 Adam's own T_v (freeze_step = kappa = 6: 6 dense steps, then 6 refreshes per interval): 45 dense steps
    "adam1bit sign 0/1-Adam T_v kappa=6": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                           "optim.freeze_step=6", "optim.var_update_scaler=6"],
    # the dense steps' average by the two-phase int8 collective (optim.warmup_comm=int8, ~1.5 B/param at p = 4,
    # half of bf16): twice the warm-up for the bytes, 96 steps (8%) in 1200, <= 1/10 of bf16 over the run
    "adam1bit sign int8 warm-up freeze=96": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                             "optim.freeze_step=96", "optim.warmup_comm=int8"],
    # 0/1 Adam's default kappa = 16 (DeepSpeed's var_update_scaler): 99 dense steps in 1200, int8 so that
    # the run stays <= 1/10 of bf16
    "adam1bit sign 0/1-Adam T_v kappa=16 int8": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                                 "optim.freeze_step=16", "optim.var_update_scaler=16",
                                                 "optim.warmup_comm=int8"],
    "adam1bit sign 0/1-Adam T_v kappa=6 int8": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                                "optim.freeze_step=6", "optim.var_update_scaler=6",
                                                "optim.warmup_comm=int8"],
    # the same with the spacing capped at 16 steps (optim.var_max_interval): 94 int8 dense steps, 1/10.2 of bf16
    "adam1bit sign 0/1-Adam T_v kappa=6 cap 16 int8": ["optim=adam1bit", "optim.weight_decay=0.1",
                                                       "optim.warmup_steps=20", "optim.freeze_step=6",
                                                       "optim.var_update_scaler=6", "optim.var_max_interval=16",
                                                       "optim.warmup_comm=int8"],
    # diagnostic, over the byte budget (94 bf16 dense steps, 1/7.3): is the late gap the variance's staleness?
    "adam1bit sign 0/1-Adam T_v kappa=6 cap 16": ["optim=adam1bit", "optim.weight_decay=0.1", "optim.warmup_steps=20",
                                                  "optim.freeze_step=6", "optim.var_update_scaler=6",
                                                  "optim.var_max_interval=16"],
    # DeMo with Psyche's look-ahead overlap (optim.overlap=true): the gather hides behind the next step
    "demo k=32 bf16 overlap": ["optim=demo", "optim.overlap=true"],
    "demo 1-bit k=16 overlap": ["optim=demo", "optim.k=16", "optim.bits=1", "optim.overlap=true"],
}
# rows whose optimizer needs another LR grid than --lrs: Signum moves every parameter by lr
# each step, so its best LR is well below AdamW's
SIGNUM_LRS = [1e-3, 3e-3, 6e-3]
ROW_LRS = {"demo k=32 bf16": SIGNUM_LRS, "demo 1-bit k=16": SIGNUM_LRS, "distro 1-bit k=4": SIGNUM_LRS,
           "demo k=32 bf16 overlap": SIGNUM_LRS, "demo 1-bit k=16 overlap": SIGNUM_LRS,
           "demo v2 k=32 bf16 (AdamW on U)": [3e-3]}  # v2 steps with AdamW: AdamW's best LR
SGD_LRS = [0.03, 0.1, 0.3]   # swept on "sgd m=0.9 dense", seed 0 (1.0: val 2.698 at step 300, stopped)
ROW_LRS.update({"sgd m=0.9 dense": SGD_LRS, "sgd m=0.9 + topk 1% + ef": [0.1], "sgd + topk 1% + dgc m=0.9": [0.1],
                "sgd + topk 1% + dgc m=0.9 warm-up 120": [0.1]})
DEMO = ["demo k=32 bf16", "demo 1-bit k=16", "distro 1-bit k=4", "demo v2 k=32 bf16 (AdamW on U)"]
SETS = {"goals": ["dense", "local H=15", "diloco H=15", "sparseloco H=15"],
        "sweep": [r for r in ROWS if r not in ("dense", *DEMO)],
        "demo": DEMO,
        "demo_overlap": ["demo k=32 bf16", "demo k=32 bf16 overlap", "demo 1-bit k=16", "demo 1-bit k=16 overlap"],
        "adam01": ["adam1bit sign freeze=24 refresh kappa=3", "adam1bit sign 0/1-Adam T_v kappa=6",
                   "adam1bit sign int8 warm-up freeze=96", "adam1bit sign 0/1-Adam T_v kappa=16 int8",
                   "adam1bit sign 0/1-Adam T_v kappa=6 int8", "adam1bit sign 0/1-Adam T_v kappa=6 cap 16 int8",
                   "adam1bit sign 0/1-Adam T_v kappa=6 cap 16"],
        "overlap": ["dense", "local H=8", "local H=8 diloco-recipe", "co2 H=8", "eager H=8", "eager H=8 diloco-recipe",
                    "eager H=8 co2-recipe", "local H=30", "local H=30 + moments 1/2", "eager H=30",
                    "eager H=30 diloco-recipe", *[r for r in ROWS if r.startswith("stream ")]],
        # issue 16 on one machine, all paired: the goal rows on 3 seeds, MT-DAO's sweep on seed 0
        # issue 16 on one machine, all rows paired, in priority order (a --deadline cuts the tail): the goal
        # rows on 3 seeds, MT-DAO's sweep on seed 0, the H=30 rows on 3 seeds, extras on seed 0
        "overlap3": [*[f"{r}@0+1+2" for r in ("dense", "local H=8", "mtdao H=8 b=0.99 w=0.7", "eager H=8",
                                               "stream H=8 F=4 tau=1")],
                     *[f"{r}@0" for r in ("mtdao H=8 b=0.995 w=0.7", "mtdao H=8 b=0.999 w=0.7", "mtdao H=8 b=0.99 w=0.5",
                                          "mtdao H=8 b=0.99 w=0.9", "mtdao H=8 b=0.99 w=0.7 no-avg",
                                          "local H=8 + moment1", "mtdao dense b=0.99 w=0.7")],
                     *[f"{r}@0+1+2" for r in ("local H=30", "eager H=30", "mtdao H=30 b=0.995 w=0.7")],
                     *[f"{r}@0" for r in ("co2 H=8", "mtdao H=30 b=0.999 w=0.7", "stream H=8 F=2 tau=3")]],
        "momentum": ["adam1bit sign freeze=48", "adam1bit sign freeze=45", "adam1bit sign freeze=24 refresh kappa=3",
                     "adam1bit sign 0/1-Adam T_v kappa=6", "adam1bit sign int8 warm-up freeze=96", "sgd m=0.9 dense",
                     "sgd m=0.9 + topk 1% + ef", "sgd + topk 1% + dgc m=0.9", "sgd + topk 1% + dgc m=0.9 warm-up 120"]}
SETS["sweep"] = [r for r in SETS["sweep"] if r not in SETS["momentum"]]  # issue 23's rows: --rows momentum


def overrides(row: str, seed: int, a) -> list[str]:
    return [*ROWS[row], *MODEL, f"optim.lr={a.lr}", f"trainer.max_steps={a.steps}", f"trainer.seed={seed}",
            f"trainer.eval_every={a.eval_every}", f"trainer.checkpoint_every={10 ** 9}", "trainer.sample_chars=0",
            "trainer.progress=false", "logger=none", f"dist.nproc={a.nproc}"]


RUNS = os.path.join(OUT, "runs")   # --runs-dir
LAUNCH_EXTRA: list[str] = []        # --launch: launch-only overrides, not part of a run's identity
DEADLINE = [math.inf]               # --deadline: no run starts after this time.monotonic()


def run_dir(ov: list[str]) -> str:
    return os.path.join(RUNS, hashlib.sha1(json.dumps(ov).encode()).hexdigest()[:12])


def rows_of(d: str) -> list[dict]:
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def run(row: str, seed: int, a) -> list[dict]:
    ov = overrides(row, seed, a)
    d = run_dir(ov)
    rows = rows_of(d)
    if rows and rows[-1]["step"] == a.steps and "val_loss" in rows[-1]:
        return rows
    if time.monotonic() > DEADLINE[0]:
        print(f"  skipped {row!r} seed {seed}: past --deadline", flush=True)
        return []
    launch(ov, d, {"row": row, "seed": seed}, f"{row!r} seed {seed}")
    return rows_of(d)


def launch(ov: list[str], d: str, meta: dict, label: str, fresh: bool = True) -> None:
    """``thinwire-train`` with ``ov`` in run dir ``d`` (``meta`` and ``ov`` saved beside the
    run). ``fresh``: an unfinished earlier attempt is started over (moved to <d>/previous/,
    not deleted); else ``ov`` says how the run starts (e.g. ``trainer.resume=...``)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "overrides.json"), "w") as fh:
        json.dump({**meta, "overrides": ov}, fh)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "thinwire.train", *ov, *LAUNCH_EXTRA, f"hydra.run.dir={d}",
                        *(["trainer.overwrite=true"] if fresh else [])], capture_output=True,
                       text=True, env={**os.environ, "WANDB_MODE": "disabled"}, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
    print(f"  ran {label} in {time.perf_counter() - t0:.0f} s", flush=True)


def summary(rows: list[dict], nproc: int) -> dict:
    n_params = None
    for r in rows:
        if r.get("dense_bytes"):  # 2 (p-1)/p * n * 4
            n_params = r["dense_bytes"] / (2 * (nproc - 1) / nproc * 4)
            break
    steps = rows[-1]["step"]
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
        xs = [max(b, 1) / s0["n_params"] for _, b in s0["cum_wire"]]
        ys = [statistics.mean(per_seed[s]["curve"][i][1] for s in per_seed) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent per rank / parameters (log)")
    ax.set_ylabel("val loss (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    a = ap.parse_args(argv)
    RUNS = a.runs_dir
    LAUNCH_EXTRA[:] = a.launch
    DEADLINE[0] = time.monotonic() + a.deadline
    names = SETS.get(a.rows) or [r.strip() for r in a.rows.split(",")]
    seeds_of = {}  # "row@0+1": that row on seeds 0 and 1 only
    for i, n in enumerate(names):
        if "@" in n:
            names[i], sel = n.split("@")
            seeds_of[names[i]] = [int(x) for x in sel.split("+")]
    names = ["dense", *[n for n in names if n != "dense"]]
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
    table = report(results, a)
    if best_lr:
        table += "\n\nLR sweep (first seed, val loss): " + "; ".join(
            f"{row}: " + ", ".join(f"{lr:g} {v:.4f}" for lr, v in b["sweep"].items()) + f" (best {b['best']:g})"
            for row, b in best_lr.items())
    print(table)
    os.makedirs(OUT, exist_ok=True)
    tag = a.tag or (a.rows if a.rows in SETS else "custom")
    with open(os.path.join(OUT, f"{tag}.json"), "w") as fh:
        json.dump({"args": vars(a), "results": results, "lr_sweep": best_lr}, fh, indent=1)
    with open(os.path.join(OUT, f"{tag}.md"), "w") as fh:
        fh.write(table + "\n")
    try:
        plot(results, os.path.join(OUT, f"{tag}.png"))
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
