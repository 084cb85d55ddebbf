"""One rank of one bench/cluster.py row, launched by launch/netsim (torchrun, one rank per
network namespace). Every row, thinwire's and the torch peers', runs through here, so all
of them share thinwire's model, data, optimizer plugin, step (``Trainer.train_step``:
forward/backward through DDP, the per-step loss/non-finite control all-reduce, the
optimizer step, metrics keys) and evaluation:

    <netsim run ...> -- bench/cluster_peer.py [--peer none|fp16|powersgd|postlocal] [--rank-r R]
        [--H 8] --stop-steps N [--min-steps S] [--target LOSS] [--budget-s B] --eval-every E
        --out DIR -- <thinwire overrides...>

--peer none runs thinwire's own comm hook / sync / engine (``comm=``, ``sync=``,
``engine=`` overrides). The peers replace thinwire's comm hook with torch's, unchanged,
through the Trainer's ``comm_hook=`` factory (and PostLocalSGD the optimizer plugin,
through ``plugin_cls=``):

  fp16       torch ``default_hooks.fp16_compress_hook``
  powersgd   torch ``powerSGD_hook`` (its own error feedback, ``start_powerSGD_iter=2``,
             rank ``--rank-r``, default ``min_compression_rate``)
  postlocal  torch ``PostLocalSGDOptimizer`` around thinwire's AdamW with a
             ``PeriodicModelAverager(period=H, warmup_steps=H-1)`` and torch's
             ``post_localSGD_hook`` (``start_localSGD_iter=H-1``, no gradient all-reduce
             afterwards): the first H-1 steps are plain DDP (torch's recipe), then every
             rank steps alone and the parameters are averaged every H-th step, so every
             evaluation (a multiple of H) sees the averaged model.

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
from thinwire.comm.accounting import ring_allreduce_bytes
from thinwire.comm.hooks import HookState
from thinwire.optim.plugins import AdamWPlugin
from thinwire.trainer.loop import NonFiniteError, Trainer

TX = "/sys/class/net/eth0/statistics/tx_bytes"


def tx_bytes() -> int:
    try:
        with open(TX) as fh:
            return int(fh.read())
    except OSError:  # not in a netsim namespace: nothing measured
        return 0


class PeerState(HookState):
    """A torch hook's state as thinwire's DDP engine drives it: a ``HookState`` (the engine
    calls ``set_lr``, ``commit``, ``discard``, ``take_stats``) with the torch state inside;
    ``bytes_fn(inner, bucket)``: what the torch hook sends for the bucket. Nothing of it
    is checkpointed (this runner writes no checkpoints)."""

    def __init__(self, inner, meter, bytes_fn):
        super().__init__(meter=meter, auto_commit=False)
        self.inner, self.bytes_fn = inner, bytes_fn

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def wrap(torch_hook):
    def hook(state: PeerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.meter.charge(state.bytes_fn(state.inner, bucket), "data", "all_reduce",  # before the hook moves
                           dist.get_world_size())                                        # its counters
        state.begin_bucket(bucket)
        return torch_hook(state.inner, bucket)
    return hook


def powersgd_bytes(st, bucket) -> int:
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    p = dist.get_world_size()
    if st.iter < st.start_powerSGD_iter:
        return ring_allreduce_bytes(bucket.buffer().numel(), 4, p)
    unc = ps = qs = 0
    for g in bucket.gradients():
        n, m = g.shape[0], g.numel() // g.shape[0]
        r = min(n, m, st.matrix_approximation_rank)
        if _should_compress(n, m, r, st.min_compression_rate)[0]:
            ps, qs = ps + n * r, qs + m * r
        else:
            unc += g.numel()
    return sum(ring_allreduce_bytes(k, 4, p) for k in (unc, ps, qs))


def peer_factory(peer: str, rank_r: int, H: int):
    """A comm hook factory (``thinwire.comm.hooks.comm_hook``'s signature) that returns
    torch's hook instead, for ``Trainer(comm_hook=...)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (PostLocalSGDState,
                                                                                 post_localSGD_hook)

    def factory(name, *, meter, **_):
        p = dist.get_world_size()
        if peer == "fp16":
            return PeerState(None, meter, lambda st, b: ring_allreduce_bytes(b.buffer().numel(), 2, p)), \
                wrap(default_hooks.fp16_compress_hook)
        if peer == "powersgd":
            inner = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r,
                                       start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
            return PeerState(inner, meter, powersgd_bytes), wrap(psgd.powerSGD_hook)
        if peer == "postlocal":
            inner = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=H - 1,
                                      post_local_gradient_allreduce=False)
            return PeerState(inner, meter, lambda st, b: ring_allreduce_bytes(b.buffer().numel(), 4, p)
                             if st.iter < st.start_localSGD_iter else 0), wrap(post_localSGD_hook)
        raise ValueError(peer)
    return factory


def postlocal_plugin(H: int) -> type[AdamWPlugin]:
    """thinwire's AdamW plugin with its torch optimizer inside torch's
    ``PostLocalSGDOptimizer``, for ``Trainer(plugin_cls=...)``: the averager's all-reduce
    of every parameter is charged on the meter when it averages (its own condition,
    evaluated before it runs)."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    class Counted(PostLocalSGDOptimizer):
        def __init__(self, optim, averager, meter):
            super().__init__(optim=optim, averager=averager)
            numel = sum(q.numel() for g in optim.param_groups for q in g["params"])
            self.meter, self.nbytes = meter, ring_allreduce_bytes(numel, 4, dist.get_world_size())

        def step(self):
            a = self.averager
            if a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0:
                self.meter.charge(self.nbytes, "data")  # one flat fp32 all-reduce of every parameter
            super().step()

    class PostLocalAdamW(AdamWPlugin):
        def make_optimizer(self, groups):
            return Counted(super().make_optimizer(groups), PeriodicModelAverager(period=H, warmup_steps=H - 1),
                           self.meter)

    return PostLocalAdamW


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default="none", choices=["none", "fp16", "powersgd", "postlocal"])
    ap.add_argument("--rank-r", type=int, default=2)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--stop-steps", type=int, required=True)
    ap.add_argument("--min-steps", type=int, default=0)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--budget-s", type=float, default=math.inf)
    ap.add_argument("--eval-every", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log-calls", action="store_true",
                    help="write every training step's collective calls (bench/netclock.py's input) to rank<r>.json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from thinwire.config import compose, validate
    from thinwire.trainer.agreement import check_config_agreement
    from thinwire.trainer.world import init_world, shutdown

    cfg = compose([*a.overrides, f"hydra.run.dir={a.out}"])
    validate(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    peer = {}
    if a.peer != "none":
        peer["comm_hook"] = peer_factory(a.peer, a.rank_r, a.H)
    if a.peer == "postlocal":
        peer["plugin_cls"] = postlocal_plugin(a.H)
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
