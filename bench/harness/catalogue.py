"""The row catalogue: every method the benchmarks run, defined once, as a name -> thinwire
config overrides. The studies draw their rows from here: the quality harness
(``bench/quality.py``: ``QUALITY_ROWS``, its sets ``SETS`` and LR grids ``ROW_LRS``), the
time-to-target protocol (``bench/time_to_target.py``: ``TTT_ROWS``; the network clock's extra
protocol rows ``CLOCK_TTT_ROWS``), the cluster matrix and the clock's validation
(``bench/cluster.py``, ``bench/netclock_validate.py``: their labels name rows here), the presets
(``preset_rows``, ``REFERENCE``) and the projections (``bench/netclock.py``: each projected
method names the protocol row its steps to target come from).

A row is its overrides only; how a study runs it (model, steps, seed, LR, schedule) is the
study's. torch's peers (``PEER_ROWS``) run thinwire's Trainer with torch's hook
(``harness/cluster_peer.py``), their overrides are the DDP fp32 run they replace.
"""
from __future__ import annotations

import os

from . import REPO

# the quality harness's model and data (bench/quality.py; the time-to-target protocol's too)
MODEL = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.block_size=32",
         "data.batch_size=8", "data.eval_batches=64"]
LOCAL = ["sync.clip=inf"]  # no row clips its pseudo-gradient (SparseLoCo and DiLoCo do not)
CO2_RECIPE = ["sync.outer_optim.lr=1.0", "sync.outer_optim.momentum=0.5"]    # CO2's outer Nesterov 0.5, lr 1
DILOCO_RECIPE = ["sync.outer_optim.lr=0.7", "sync.outer_optim.momentum=0.9"]  # DiLoCo's Nesterov 0.9, lr 0.7
DILOCO_07 = ["sync.outer_optim.lr=0.7"]  # sync=diloco with Douillard et al.'s lr 0.7 (the preset's own is tuned per H)
AVG_RECIPE = ["sync.outer_optim.lr=1.0", "sync.outer_optim.momentum=0.0",  # local's: lr 1, no momentum
              "sync.outer_optim.nesterov=false"]
ROWS = {
    "dense": ["comm=none", "sync=ddp"],
    "bf16": ["comm=bf16", "sync=ddp"],
    "local H=15": ["sync=local", "sync.local_steps=15", *LOCAL],
    "diloco H=15": ["sync=diloco", "sync.local_steps=15", *LOCAL, *DILOCO_07],
    "sparseloco H=15": ["experiment=sparseloco"],
    "local H=8": ["sync=local", "sync.local_steps=8", *LOCAL],
    "diloco H=30": ["sync=diloco", "sync.local_steps=30", *LOCAL, *DILOCO_07],
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
    "local H=8 diloco-recipe": ["sync=diloco", "sync.local_steps=8", *LOCAL, *DILOCO_07],
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
    # issue 33's G3 (docs/elastic.md): slot 3 of 4 sits out 10% of the outer rounds, steps 481-600 of 1200
    # (trainer.faults.absent_at, thinwire/elastic/absence.py); compared with the row without the absence
    "local H=8 slot 3 absent 10%": ["sync=local", "sync.local_steps=8", *LOCAL, "trainer.faults.absent_at=3:60..74"],
    "diloco H=15 slot 3 absent 10%": ["sync=diloco", "sync.local_steps=15", *LOCAL,
                                      "trainer.faults.absent_at=3:32..39"],
}
QUALITY_ROWS = tuple(ROWS)  # the quality harness's rows, in its order (its sets are drawn from these)
NEVER = "never synchronise"
ROWS.update({
    # the time-to-target protocol's rows (bench/time_to_target.py)
    "diloco H=8": ["sync=diloco", "sync.local_steps=8", *LOCAL, *DILOCO_07],
    NEVER: ["sync=local", "sync.local_steps=1000000", *LOCAL],  # four models that never meet, evaluated as their average
    # torch's peers (PEER_ROWS adds the peer's flags): comm=none, as DDP fp32 is
    "torch fp16 hook": ["comm=none", "sync=ddp"],
    "torch PowerSGD r2": ["comm=none", "sync=ddp"],
    "torch PowerSGD r4": ["comm=none", "sync=ddp"],
    "torch PostLocalSGD H=8": ["comm=none", "sync=ddp"],
    # torchft's Streaming DiLoCo computed by thinwire: DiLoCo's outer recipe (Nesterov 0.9, lr 0.7),
    # the paper's alpha 0.5, H=8 F=4 tau=1 (the fragments of thinwire's "stream H=8 F=4 tau=1")
    "stream H=8 F=4 tau=1 diloco-recipe": ["sync=diloco", "sync.local_steps=8", "sync.fragments=4",
                                           "sync.fragment_delay=1", "sync.fragment_alpha=0.5", *LOCAL, *DILOCO_07],
    # the same with thinwire's int8 (two-phase, error feedback), ~1 B/value as torchft's fp8
    "stream H=8 F=4 tau=1 diloco-recipe + int8": ["sync=diloco", "sync.local_steps=8", "sync.fragments=4",
                                                  "sync.fragment_delay=1", "sync.fragment_alpha=0.5", *LOCAL,
                                                  *DILOCO_07, "comm=int8"],
    "stream H=8 F=4 tau=1 + int8": [*ROWS["stream H=8 F=4 tau=1"], "comm=int8"],
    # issue 34: SparseLoCo through the run-aligned two-phase collective (owner re-selection and
    # owner residual), and streaming's pseudo-gradients in fp8 / int4 beside int8 (all two-phase)
    "sparseloco H=15 two_phase": ["experiment=sparseloco", "comm.collective=two_phase"],
    "stream H=8 F=4 tau=1 + fp8": [*ROWS["stream H=8 F=4 tau=1"], "comm=fp8"],
    "stream H=8 F=4 tau=1 + int4": [*ROWS["stream H=8 F=4 tau=1"], "comm=int4"],
    # the cluster matrix's and the clock validation's DDP compressors (bench/cluster.py, bench/netclock_validate.py)
    "int8 two-phase + ef": ["comm=int8", "comm.collective=two_phase", "sync=ddp"],
    "topk 1% + ef": ["comm=topk", "comm.ratio=0.01", "sync=ddp", "comm.feedback=ef"],
    "topk 1% + ef21": ["comm=topk", "comm.ratio=0.01", "sync=ddp", "comm.feedback=ef21"],
    "topk 1% + econtrol": ["comm=topk", "comm.ratio=0.01", "sync=ddp", "comm.feedback=econtrol", "comm.eta=0.05"],
    "sign1 + ef": ["comm=sign1", "comm.feedback=ef", "sync=ddp"],
    "co2 H=8 + int8": ["comm=int8", "sync=co2", "sync.local_steps=8"],
    "DeepSpeed ZeRO-2 bf16": ["comm=none", "sync=ddp", "engine=deepspeed", "engine.deepspeed.zero_optimization.stage=2",
                              "engine.deepspeed.communication_data_type=bf16"],
    # reference for "communication hidden": local steps that never synchronise (evaluation still
    # averages the ranks' parameters)
    "compute only (no sync)": ["comm=none", "sync=local", f"sync.local_steps={10 ** 9}"],
})
# issue 35: DiLoCo's outer recipe swept as Charles et al. 2025 (arXiv 2503.09799, Sec. 3) did: outer SGD,
# Nesterov 0.9, lr over {0.2, 0.4, 0.6, 0.8, 1.0}, at each H, and 0.1 below the paper's grid (H = 8's best was
# its lowest, 0.2); every outer setting spelt out, so a row does not depend on what configs/sync/diloco.yaml resolves
DILOCO_HS = (8, 15, 30)
DILOCO_OUTER_LRS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def diloco_row(h: int, outer_lr: float) -> list[str]:
    """DiLoCo at H inner steps with outer SGD lr ``outer_lr``, Nesterov 0.9, no clipping."""
    return ["sync=diloco", f"sync.local_steps={h}", *LOCAL, f"sync.outer_optim.lr={outer_lr}",
            "sync.outer_optim.momentum=0.9", "sync.outer_optim.nesterov=true"]


ROWS.update({f"diloco H={h} olr={lr:g}": diloco_row(h, lr) for h in DILOCO_HS for lr in DILOCO_OUTER_LRS})
# torch's peers: (harness/cluster_peer.py --peer, its --rank-r or --H)
PEER_ROWS = {"torch fp16 hook": ("fp16", 0), "torch PowerSGD r2": ("powersgd", 2), "torch PowerSGD r4": ("powersgd", 4),
             "torch PostLocalSGD H=8": ("postlocal", 8)}
# the time-to-target protocol's own rows, in its table's order
TTT_ROWS = ("dense", "local H=8", "diloco H=8", NEVER, "torch PowerSGD r4", "torch PostLocalSGD H=8",
            "stream H=8 F=4 tau=1 diloco-recipe", "stream H=8 F=4 tau=1 diloco-recipe + int8")
# the rows the protocol runs for the network clock beyond its own (bench/netclock.py --ttt)
CLOCK_TTT_ROWS = ("bf16", "co2 H=8", "stream H=8 F=4 tau=1", "stream H=8 F=4 tau=1 + int8", "sparseloco H=8", "eager H=8")


def overrides(row: str) -> list[str]:
    """The row's overrides (a copy); an unknown name fails with the known ones."""
    if row not in ROWS:
        raise KeyError(f"unknown row {row!r} (the catalogue, bench/harness/catalogue.py, has: {', '.join(ROWS)})")
    return list(ROWS[row])


def spelt(row: str) -> list[str]:
    """The row's overrides with ``comm=none`` spelt out when the row names no compressor."""
    ov = overrides(row)
    return ov if any(o.startswith("comm=") for o in ov) else ["comm=none", *ov]


def peer_args(row: str) -> list[str]:
    """harness/cluster_peer.py's flags for a torch peer row ([] for thinwire's own rows)."""
    if row not in PEER_ROWS:
        return []
    kind, k = PEER_ROWS[row]
    return [f"--peer={kind}", *({"powersgd": [f"--rank-r={k}"], "postlocal": [f"--H={k}"]}.get(kind, []))]


def period(row: str) -> int:
    """The steps of one round of the row (its outer step, H; PostLocalSGD's averaging period;
    1 for DDP and for a row that never synchronises): the protocol's branch points must fall on
    completed rounds."""
    if PEER_ROWS.get(row, ("",))[0] == "postlocal":
        return PEER_ROWS[row][1]
    h = [int(o.split("=", 1)[1]) for o in ROWS[row] if o.startswith("sync.local_steps=")]
    for o in ROWS[row]:
        if not h and o.startswith("experiment="):  # the preset's own H
            from omegaconf import OmegaConf

            preset = OmegaConf.load(os.path.join(REPO, "configs", "experiment", o.split("=", 1)[1] + ".yaml"))
            h = [int(OmegaConf.select(preset, "sync.local_steps", default=1))]
    return h[-1] if h and h[-1] < 10 ** 5 else 1


# -- the presets (bench/presets.py): the quickstart's default config and every configs/experiment/*.yaml
REFERENCE = ["sync=ddp", "comm=bf16", "optim=adamw", "peft=none"]  # plain data parallelism, bf16 gradients


def preset_rows() -> dict[str, list[str]]:
    names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "experiment")) if f.endswith(".yaml"))
    return {"default": [], **{n: [f"experiment={n}"] for n in names}}


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
        "sweep": [r for r in QUALITY_ROWS if r not in ("dense", *DEMO)],
        "demo": DEMO,
        "demo_overlap": ["demo k=32 bf16", "demo k=32 bf16 overlap", "demo 1-bit k=16", "demo 1-bit k=16 overlap"],
        "adam01": ["adam1bit sign freeze=24 refresh kappa=3", "adam1bit sign 0/1-Adam T_v kappa=6",
                   "adam1bit sign int8 warm-up freeze=96", "adam1bit sign 0/1-Adam T_v kappa=16 int8",
                   "adam1bit sign 0/1-Adam T_v kappa=6 int8", "adam1bit sign 0/1-Adam T_v kappa=6 cap 16 int8",
                   "adam1bit sign 0/1-Adam T_v kappa=6 cap 16"],
        "overlap": ["dense", "local H=8", "local H=8 diloco-recipe", "co2 H=8", "eager H=8", "eager H=8 diloco-recipe",
                    "eager H=8 co2-recipe", "local H=30", "local H=30 + moments 1/2", "eager H=30",
                    "eager H=30 diloco-recipe", *[r for r in QUALITY_ROWS if r.startswith("stream ")]],
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
# issue 35 item 2, seed 0 first, the likeliest optima and the references before the grid's edges
# (a --deadline cuts the tail); 4 ranks, or --nproc 1 / 2
SETS["diloco_tuned"] = ["dense", "diloco H=15 olr=0.4", "local H=15", "diloco H=8 olr=0.2", "local H=8",
                        "diloco H=30 olr=0.6", "local H=30", "diloco H=15 olr=0.2", "diloco H=8 olr=0.4",
                        "diloco H=30 olr=0.4", "diloco H=30 olr=0.8", "diloco H=15 olr=0.6", "diloco H=8 olr=0.6",
                        "diloco H=30 olr=1", "diloco H=15 olr=0.8", "diloco H=8 olr=0.8", "diloco H=15 olr=1",
                        "diloco H=8 olr=1"]
# issue 34 (docs/quality.md): two_phase SparseLoCo vs the all-gather's, and streaming's fp8 / int4 vs int8
SETS["exchange"] = ["sparseloco H=15", "sparseloco H=15 two_phase", "stream H=8 F=4 tau=1 + int8",
                    "stream H=8 F=4 tau=1 + fp8", "stream H=8 F=4 tau=1 + int4"]
SETS["sweep"] = [r for r in SETS["sweep"] if r not in SETS["momentum"]]  # issue 23's rows: --rows momentum
