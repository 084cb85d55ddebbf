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
through ``plugin_cls=``):

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
    is checkpointed (fp16's hook has no state; see the subclasses for the others)."""

    def __init__(self, inner, meter, bytes_fn):
        super().__init__(meter=meter, auto_commit=False)
        self.inner, self.bytes_fn = inner, bytes_fn

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def before_hook(self, bucket, first: bool) -> None:
        """Called before torch's hook on every bucket (``first``: the iteration's first)."""


class PostLocalPeer(PeerState):
    """torch's ``PostLocalSGDState``: its iteration counter decides global vs local steps,
    so it is checkpointed (else a resumed run would all-reduce gradients again for
    ``start_localSGD_iter`` steps)."""

    def state_dict(self) -> dict:
        return {**HookState.state_dict(self), "iter": int(self.inner.iter)}

    def load_state_dict(self, state: dict) -> None:
        HookState.load_state_dict(self, state)
        self.inner.iter = int(state["iter"])


def powersgd_layout(shapes, rank: int, min_rate: float = 2) -> tuple[list, dict, int, int]:
    """Where torch's ``powerSGD_hook`` keeps each tensor of one bucket (gradients of
    ``shapes``, in bucket order): ``(err, q, P size, Q size)``, ``err[i] = (offset, numel)``
    in the bucket-length error vector, ``q[i] = (offset, m r)`` in the Q memory for the
    compressed tensors only. Q is laid out as the hook does: compressed tensors (viewed
    as (n, m), r = min(n, m, rank), compressed when ``_should_compress``) grouped by that
    shape, groups in order of first appearance, bucket order within a group."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    err, groups, off = [], {}, 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        err.append((off, numel))
        off += numel
        n, m = shape[0], numel // shape[0]
        if _should_compress(n, m, min(n, m, rank), min_rate)[0]:
            groups.setdefault((n, m), []).append(i)
    q, qo, po = {}, 0, 0
    for (n, m), members in groups.items():
        r = min(n, m, rank)
        for i in members:
            q[i] = (qo, m * r)
            qo, po = qo + m * r, po + n * r
    return err, q, po, qo


def split_by_name(layout, error, qmem, rank: int, min_rate: float) -> dict:
    """``{name: (error slice, Q slice or None)}`` of one bucket's flat tensors laid out as
    ``layout`` (``((name, shape), ...)``)."""
    err, q, _, _ = powersgd_layout([s for _, s in layout], rank, min_rate)
    out = {}
    for i, (name, _) in enumerate(layout):
        o, n = err[i]
        e = None if error is None else error[o:o + n].clone()
        out[name] = (e, None if i not in q or qmem is None else qmem[q[i][0]:q[i][0] + q[i][1]].clone())
    return out


def join_by_name(layout, by_name: dict, rank: int, min_rate: float):
    """The flat ``(error, P memory, Q memory)`` for a bucket laid out as ``layout``, from
    ``by_name`` (:func:`split_by_name`'s); None where a name is missing."""
    err, q, p_size, _ = powersgd_layout([s for _, s in layout], rank, min_rate)
    if any(name not in by_name or by_name[name][0] is None for name, _ in layout):
        return None
    error = torch.cat([by_name[name][0] for name, _ in layout])
    qs = [by_name[layout[i][0]][1] for i in sorted(q, key=lambda i: q[i][0])]
    if any(x is None for x in qs):
        return None
    qmem = torch.cat(qs) if qs else error.new_empty(0)
    return error, error.new_empty(p_size), qmem


class PowerSGDPeer(PeerState):
    """torch's ``PowerSGDState`` checkpointed by parameter name.

    torch keys the error-feedback residual and the warm-started Q by ``bucket.index()``
    (flat tensors in the bucket's layout). DDP runs a new process's first iteration on its
    initial buckets and rebuilds them after it, so a resumed run sees two layouts in its
    first two iterations, neither necessarily the one the checkpoint was written under.
    Here the state is saved per parameter name, and before torch's hook runs on a bucket
    whose layout this process has not seen for that index, its flat tensors are rebuilt
    from the per-name values as of the start of the iteration (a snapshot taken at the
    iteration's first bucket, so buckets already processed in it cannot leak new values
    into others). torch's own hook runs unchanged."""

    def __init__(self, inner, meter, model=None):
        super().__init__(inner, meter, powersgd_bytes)
        if model is not None:
            self.bind(model)
        self.layouts: dict[int, tuple] = {}  # bucket index -> ((name, shape), ...) of torch's flat tensors
        self.by_name: dict = {}             # name -> (error, Q slice): loaded, or split from a snapshot
        self._snap: dict = {}

    def _split(self, snap: dict) -> dict:
        st, out = self.inner, {}
        for layout, error, qmem in snap.values():
            out.update(split_by_name(layout, error, qmem, st.matrix_approximation_rank, st.min_compression_rate))
        return out

    def _current(self) -> dict:
        st = self.inner
        return {i: (lay, st.error_dict.get(i), st.q_memory_dict.get(i)) for i, lay in self.layouts.items()}

    def before_hook(self, bucket, first: bool) -> None:
        st = self.inner
        if st.iter < st.start_powerSGD_iter:
            return  # vanilla all-reduce: no state
        if first:  # Q is updated in place by the hook: copy; the error is replaced, not written
            self._snap = {i: (lay, e, None if q is None else q.clone()) for i, (lay, e, q) in self._current().items()}
        idx = bucket.index()
        layout = tuple((n, tuple(g.shape)) for n, g in zip(self.bucket_names(bucket), bucket.gradients()))
        if self.layouts.get(idx) == layout:
            return
        self.by_name.update(self._split(self._snap))
        names = {n for n, _ in layout}
        for j in [j for j, lay in self.layouts.items() if j != idx and names & {n for n, _ in lay}]:
            del self.layouts[j]  # an old layout holding some of these parameters: stale now
            for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
                d.pop(j, None)
        flat = join_by_name(layout, self.by_name, st.matrix_approximation_rank, st.min_compression_rate)
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.pop(idx, None)
        if flat is not None:  # else (a fresh run's first compressed step) torch starts from zero / random Q
            st.error_dict[idx], st.p_memory_dict[idx], st.q_memory_dict[idx] = flat
        self.layouts[idx] = layout

    def state_dict(self) -> dict:
        st = self.inner
        by_name = {**self.by_name, **self._split(self._current())}
        _, keys, pos, has_gauss, gauss = st.rng.get_state()
        return {**HookState.state_dict(self), "iter": int(st.iter),
                "rng": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "error": {n: e for n, (e, _) in by_name.items() if e is not None},
                "q": {n: q for n, (_, q) in by_name.items() if q is not None}}

    def load_state_dict(self, state: dict) -> None:
        HookState.load_state_dict(self, state)
        st, r = self.inner, state["rng"]
        st.iter = int(state["iter"])
        st.rng.set_state(("MT19937", r["keys"].numpy().astype("uint32"), r["pos"], r["has_gauss"], r["gauss"]))
        self.by_name = {n: (e, state["q"].get(n)) for n, e in state["error"].items()}
        self.layouts, self._snap = {}, {}
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.clear()


def wrap(torch_hook):
    def hook(state: PeerState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.meter.charge(state.bytes_fn(state.inner, bucket), "data", "all_reduce",  # before the hook moves
                           dist.get_world_size())                                        # its counters
        first = not state._launched
        state.begin_bucket(bucket)
        state.before_hook(bucket, first)
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


def peer_factory(peer: str, rank_r: int, H: int, start_iter: int | None = None):
    """A comm hook factory (``thinwire.comm.hooks.comm_hook``'s signature) that returns
    torch's hook instead, for ``Trainer(comm_hook=...)``; ``start_iter``: PowerSGD's
    ``start_powerSGD_iter`` (default 2) or PostLocalSGD's ``start_localSGD_iter`` (H-1)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (PostLocalSGDState,
                                                                                 post_localSGD_hook)

    def factory(name, *, meter, model=None, **_):
        p = dist.get_world_size()
        if peer == "fp16":
            return PeerState(None, meter, lambda st, b: ring_allreduce_bytes(b.buffer().numel(), 2, p)), \
                wrap(default_hooks.fp16_compress_hook)
        if peer == "powersgd":
            inner = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank_r,
                                       start_powerSGD_iter=2 if start_iter is None else start_iter,
                                       use_error_feedback=True, warm_start=True)
            return PowerSGDPeer(inner, meter, model), wrap(psgd.powerSGD_hook)
        if peer == "postlocal":
            inner = PostLocalSGDState(process_group=None, subgroup=None,
                                      start_localSGD_iter=H - 1 if start_iter is None else start_iter,
                                      post_local_gradient_allreduce=False)
            return PostLocalPeer(inner, meter, lambda st, b: ring_allreduce_bytes(b.buffer().numel(), 4, p)
                                 if st.iter < st.start_localSGD_iter else 0), wrap(post_localSGD_hook)
        raise ValueError(peer)
    return factory


def postlocal_plugin(H: int, warmup: int | None = None) -> type[AdamWPlugin]:
    """thinwire's AdamW plugin with its torch optimizer inside torch's
    ``PostLocalSGDOptimizer``, for ``Trainer(plugin_cls=...)``: the averager's all-reduce
    of every parameter is charged on the meter when it averages (its own condition,
    evaluated before it runs). Its state (AdamW's moments, which differ between ranks
    once they step alone, and the averager's step) is checkpointed per rank."""
    warmup = H - 1 if warmup is None else warmup
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    class Counted(PostLocalSGDOptimizer):
        def __init__(self, optim, averager, meter):
            super().__init__(optim=optim, averager=averager)
            numel = sum(q.numel() for g in optim.param_groups for q in g["params"])
            self.meter, self.nbytes = meter, ring_allreduce_bytes(numel, 4, dist.get_world_size())

        def load_state_dict(self, state_dict):
            # torch's PostLocalSGDOptimizer binds param_groups once, in __init__; the inner
            # optimizer's load_state_dict replaces its list, so without this the LR schedule
            # would write to the old groups and a resumed run keep the checkpoint's LR
            super().load_state_dict(state_dict)
            self.param_groups = self.optim.param_groups

        def step(self):
            a = self.averager
            if a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0:
                self.meter.charge(self.nbytes, "data")  # one flat fp32 all-reduce of every parameter
            super().step()

    class PostLocalAdamW(AdamWPlugin):
        per_rank_state = True

        def make_optimizer(self, groups):
            return Counted(super().make_optimizer(groups), PeriodicModelAverager(period=H, warmup_steps=warmup),
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
