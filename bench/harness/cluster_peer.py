"""One rank of one bench/cluster.py row, launched by launch/netsim (torchrun, one rank per
network namespace). Every row, thinwire's and the torch peers', runs through here, so all
of them share thinwire's model, data, optimizer plugin, step (``Trainer.train_step``:
forward/backward through DDP, the per-step loss/non-finite control all-reduce, the
optimizer step, metrics keys) and evaluation:

    <netsim run ...> -- bench/cluster_peer.py [--peer none|fp16|powersgd|postlocal] [--rank-r R]
        [--H 8] [--start-iter W] --stop-steps N [--min-steps S] [--target LOSS] [--budget-s B]
        --eval-every E --out DIR -- <thinwire overrides...>
    torchrun --nproc-per-node N bench/cluster_peer.py --protocol --peer powersgd ... -- <overrides>
        # a plain thinwire run (checkpoints, resume) with the peer: bench/time_to_target.py's peer rows

--peer none runs thinwire's own comm hook / sync / engine (``comm=``, ``sync=``,
``engine=`` overrides). The peers replace thinwire's comm hook with torch's, unchanged,
through the Trainer's ``comm_hook=`` factory (and PostLocalSGD the optimizer plugin,
through ``plugin_cls=``; the peers themselves are in harness/peers.py):

  fp16       torch ``default_hooks.fp16_compress_hook``
  powersgd   torch ``powerSGD_hook`` (its own error feedback and warm start,
             ``start_powerSGD_iter`` = ``--start-iter``, 2 by default: the smallest torch
             allows; rank ``--rank-r``, default ``min_compression_rate``)
  postlocal  torch ``PostLocalSGDOptimizer`` around thinwire's AdamW with a
             ``PeriodicModelAverager(period=H, warmup_steps=W)`` and torch's
             ``post_localSGD_hook`` (``start_localSGD_iter=W``, no gradient all-reduce
             afterwards; W = ``--start-iter``, H-1 by default): the first W steps are plain DDP
             (torch's recipe), then every rank steps alone and the parameters are averaged
             every H-th step; with W = H-1 (mod H) every multiple of H (every evaluation,
             every checkpoint of the time-to-target protocol) sees the averaged model.

``--protocol`` runs thinwire's ``Trainer.run`` as ``thinwire-train`` does (its checkpoints,
``trainer.resume``, evaluation and metrics), with the peer plugged in as above, one process
per rank under torchrun: what ``bench/time_to_target.py`` launches for its torch peer rows.
The peers' states then go into thinwire's checkpoints (:class:`PowerSGDPeer`,
:class:`PostLocalPeer`, the optimizer's averager step, per-rank AdamW moments), so a decay
branch resumed from the constant run continues as the uninterrupted run would.

Accounted bytes of the peers (this rank's sends, ring all-reduce 2 (p-1)/p n b, charged
on thinwire's WireMeter as the hooks launch, so they appear as ``wire_bytes`` like
thinwire's own):

  fp16       ring all-reduce of the bucket in fp16 (b = 2);
  powersgd   before ``start_powerSGD_iter``: fp32 all-reduce of the bucket. After: torch's
             own split, recomputed per bucket: every gradient viewed as (shape[0], -1),
             r = min(n, m, rank), compressed if ``_should_compress`` says so: fp32
             all-reduces of the concatenated uncompressed tensors (biases, norms,
             rank-1 tensors: counted dense), of all P (sum n r) and of all Q (sum m r);
  postlocal  fp32 all-reduce of the bucket while the hook is in its global phase; then
             nothing per step and a fp32 all-reduce of all parameters when the averager
             averages (its own condition, evaluated before it runs).

The loop is ``Trainer.run`` (a subclass, :class:`BenchTrainer`, sets when to evaluate and
stop and writes no checkpoints): it stops after ``--stop-steps``, or at the first
evaluation at or after ``--min-steps`` whose val loss is <= ``--target``, or at the first
evaluation after ``--budget-s`` seconds of training step time (the max over ranks, agreed
with one 8-byte control all-reduce per evaluation, accounted). Each rank
reads its own eth0 ``tx_bytes`` before its first step and around every evaluation and
writes ``DIR/rank<r>.json``: measured and accounted bytes of the training steps and of the
evaluations. Rank 0 also writes ``DIR/metrics.jsonl`` (thinwire's metrics lines).
"""
# no "from __future__ import annotations": DDP checks the hook's return annotation at runtime
import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from thinwire.comm import accounting
from thinwire.trainer.loop import NonFiniteError, Trainer

from .peers import peer_factory, postlocal_plugin

TX = "/sys/class/net/eth0/statistics/tx_bytes"


def tx_bytes() -> int:
    try:
        with open(TX) as fh:
            return int(fh.read())
    except OSError:  # not in a netsim namespace: nothing measured
        return 0


class BenchTrainer(Trainer):
    """thinwire's Trainer with this runner's schedule: evaluation every ``--eval-every``
    steps and at ``--stop-steps``, the stopping rules of the module docstring, per-rank
    accounted and measured bytes of training and evaluation, no checkpoints (their
    traffic would fall into the measured window)."""

    def __init__(self, cfg, world, a, **kw):
        super().__init__(cfg, world, **kw)
        self.a = a
        self.acc = {"train": 0, "eval": 0}
        self.meas = {"train": 0, "eval": 0}
        self.train_s, self.steps, self.t_max, self.stop_reason = 0.0, 0, 0.0, "stop_steps"
        self.calls: list = []  # --log-calls: per step, the collective calls the accounting charged
        if a.log_calls:
            self.meter.log = []

    def train_step(self, step: int) -> dict:
        n0 = len(self.meter.log) if self.meter.log is not None else 0
        rec = super().train_step(step)
        if self.meter.log is not None:  # evaluation's calls (kind eval) fall between steps: left out
            self.calls.append([c for c in self.meter.log[n0:] if c[1] in ("data", "control")])
        self.steps = step + 1
        self.train_s += rec["step_time_s"]
        self.acc["train"] += rec["wire_bytes"]
        return rec

    def eval_due(self, done: int) -> bool:
        return done % self.a.eval_every == 0 or done == self.a.stop_steps

    def run_eval(self, record: dict) -> None:
        te, before = tx_bytes(), record["wire_bytes"]
        super().run_eval(record)
        t_max = torch.tensor([self.train_s], dtype=torch.float64)
        accounting.all_reduce(self.meter, t_max, op=dist.ReduceOp.MAX, kind="eval")
        self.t_max = float(t_max)
        record["eval_bytes"] += self.meter.take_step().pop("eval", 0)
        self.acc["eval"] += record["eval_bytes"]
        # training traffic charged while evaluating (a callback's collective): the Trainer
        # adds it to the step's wire_bytes, and so does this count
        self.acc["train"] += record["wire_bytes"] - before
        self.meas["eval"] += tx_bytes() - te

    def stop_early(self, record: dict) -> bool:
        a, done = self.a, record["step"]
        if "val_loss" not in record:
            return False
        reached = a.target is not None and done >= a.min_steps and record["val_loss"] <= a.target
        if reached or self.t_max >= a.budget_s or done == a.stop_steps:
            self.stop_reason = "target" if reached else ("budget" if self.t_max >= a.budget_s else "stop_steps")
            return True
        return False

    def save(self, step: int) -> str:
        return ""  # no checkpoints: see the class docstring


def protocol_run(a, peer: dict) -> int:
    """``--protocol``: one run as ``thinwire-train`` makes it (``thinwire.trainer.loop.train``:
    run-dir lock, config agreement, checkpoints, resume, evaluation), with the peer."""
    from thinwire.config import compose, validate
    from thinwire.trainer.agreement import check_config_agreement
    from thinwire.trainer.loop import take_run_dir
    from thinwire.trainer.world import init_world, shutdown

    cfg = compose(a.overrides)
    validate(cfg)
    world = init_world(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.threads)
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
        check_config_agreement(cfg, world)
        lock = take_run_dir(cfg, world)
        try:
            tr = Trainer(cfg, world, **peer)
            try:
                record = tr.run()
                if world.is_main and "val_loss" in record:
                    print(f"thinwire: step {record['step']} val_loss {record['val_loss']:.4f}", flush=True)
            finally:
                tr.close()
        finally:
            if lock is not None:
                lock.release()
    finally:
        shutdown()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default="none", choices=["none", "fp16", "powersgd", "postlocal"])
    ap.add_argument("--rank-r", type=int, default=2)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--start-iter", type=int, default=None,
                    help="PowerSGD's start_powerSGD_iter (default 2) / PostLocalSGD's start_localSGD_iter (H-1)")
    ap.add_argument("--protocol", action="store_true",
                    help="a plain thinwire run with the peer (checkpoints, resume): bench/time_to_target.py's "
                         "peer rows; the netsim options below are not used")
    ap.add_argument("--stop-steps", type=int)
    ap.add_argument("--min-steps", type=int, default=0)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=math.inf)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--out")
    ap.add_argument("--log-calls", action="store_true",
                    help="write every training step's collective calls (bench/netclock.py's input) to rank<r>.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    peer = {}
    if a.peer != "none":
        peer["comm_hook"] = peer_factory(a.peer, a.rank_r, a.H, a.start_iter)
    if a.peer == "postlocal":
        peer["plugin_cls"] = postlocal_plugin(a.H, a.start_iter)
    if a.protocol:
        return protocol_run(a, peer)
    if a.stop_steps is None or a.eval_every is None or a.out is None:
        ap.error("--stop-steps, --eval-every and --out are required (except with --protocol)")

    from thinwire.config import compose, validate
    from thinwire.trainer.agreement import check_config_agreement
    from thinwire.trainer.world import init_world, shutdown

    cfg = compose([*a.overrides, f"hydra.run.dir={a.out}"])
    validate(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    world = init_world(cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.threads)
    check_config_agreement(cfg, world)
    tr = BenchTrainer(cfg, world, a, **peer)
    dist.barrier()  # set-up traffic (DDP's parameter broadcast) has left every eth0
    tx0 = tx_bytes()
    try:
        tr.run()
    except NonFiniteError:  # ranks agreed (sync=ddp): all stop here
        tr.stop_reason = "non-finite"
    finally:
        tr.meas["train"] = tx_bytes() - tx0 - tr.meas["eval"]
        with open(os.path.join(a.out, f"rank{world.rank}.json"), "w") as fh:
            json.dump({"rank": world.rank, "steps": tr.steps, "train_s": tr.train_s, "stop": tr.stop_reason,
                       "accounted": tr.acc, "measured": tr.meas, "numel": tr.engine.numel,
                       **({"calls": tr.calls} if a.log_calls else {})}, fh)
        tr.close()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
