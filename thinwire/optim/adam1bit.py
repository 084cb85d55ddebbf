"""``optim=adam1bit``: 1-bit Adam (Tang et al. 2021, "1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed", arXiv 2102.02888, Algorithm 1; the
reference implementation was DeepSpeed's ``OnebitAdam``, ``deepspeed/runtime/fp16/onebit/
adam.py``, removed in DeepSpeed 0.19.8 and never run on CPU).

Two phases, on every rank, for every trainable tensor (the plugin owns its exchange: no DDP
wrapper, like ``optim=demo``):

**Warm-up** (the first ``optim.freeze_step`` accepted steps): AdamW on the mean gradient.
The gradients are averaged by one accounted all-reduce per step, bf16 (``optim.warmup_comm
=bf16``, as ``comm=bf16``) or fp32 (``fp32``, as ``comm=none``), or by the two-phase int8
collective (``int8``, as ``comm=int8 comm.collective=two_phase``: blockwise absmax codes, about
half of bf16's bytes; its server error is plugin state; a thinwire option, not the paper's;
measured unsafe with a short warm-up: Adam's first steps move every coordinate by about lr, and
int8's one scale per block turns small coordinates into noise; docs/optim.md)::

    g <- mean_i g_i;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2

**Compression stage** (every later step): v is frozen (Algorithm 1, line 11: the variance
is no longer updated) and the first moment is what travels, compressed with error feedback
through the two-phase collective (``thinwire.comm.collectives``: every rank's tensor is cut
into p chunks; chunk j goes to rank j, which averages, adds its server error, re-compresses
and all-gathers it back: Sec. 4 of the paper)::

    m_i <- b1 m + (1 - b1) g_i                       this rank's local momentum (g_i its own gradient)
    m   <- two_phase_mean(m_i)                       worker error e_i: m_i + e_i is compressed,
                                                     e_i <- (m_i + e_i) - C(m_i + e_i);
                                                     the chunk owner's server error likewise

so after every step every rank holds the same m: the decompressed average (Algorithm 1, line
9), not its local m_i. The compressor is ``comm=sign1`` (scale = mean |x| per block of
``optim.block_size``, the paper's scaled sign with a per-block scale) or ``comm=int8``
(``optim.compressor``); the error buffers are ``comm.feedback=ef``'s and the two-phase
collective's server errors, through :class:`~thinwire.comm.aggregator.CompressedAggregator`
(the same code as ``comm=sign1 comm.feedback=ef``, staged and committed per step).

Both phases then step with AdamW's update on the (frozen) variance, with torch.optim.AdamW's
bias corrections (t = accepted steps, the variance's correction fixed at the freeze)::

    p <- p (1 - lr wd)                               decoupled decay, matrices only (thinwire's grouping)
    p <- p - lr/(1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^min(t, T_freeze)) + eps)

Departures from the reference, and why: the warm-up all-reduce may be bf16 (the paper's is
fp32/fp16 with its own accounting); AdamW's bias corrections are kept (DeepSpeed's OnebitAdam
drops them; with them the warm-up is torch's AdamW, step for step); gradient clipping
(``optim.grad_clip``) applies to the mean gradient during the warm-up, as with DDP, and to
this rank's own gradient afterwards (there is no mean gradient in the compression stage);
weight decay is decoupled (AdamW) and only on matrices. ``engine=deepspeed`` is
rejected (``check_run``): ZeRO partitions the optimizer state and reduce-scatters the
gradients with its own collectives, while this plugin needs every rank to hold the whole
first moment and frozen variance to compress the momentum itself (DeepSpeed's 1-bit
optimizers never ran with ZeRO either).

**Variance refreshes** (``optim.var_update_scaler`` = kappa > 0; 0/1 Adam, Lu et al. 2022,
arXiv 2202.06009, Sec. 4.1, the set T_v of variance-update steps; DeepSpeed's ``ZeroOneAdam``
``var_interval`` / ``var_update_scaler``): after the ``freeze_step`` dense steps, some later
steps are dense again (the warm-up's bf16/fp32 all-reduce, m and v updated with the mean
gradient, v's bias correction counting its updates), on multiples of 2 (1-based) for kappa
refreshes, then of 4 for kappa more, 8, ... (:func:`dense_step`); with ``freeze_step = kappa``
this is 0/1 Adam's T_v, step for step. Departures: 0/1 Adam's steps between refreshes send the 1-bit *gradient*;
here they are 1-bit Adam's compressed-momentum steps (one compressor, one error-feedback
state), and the refreshes go on for the whole run (0/1 Adam stops them at ``var_freeze_step``,
the end of its LR warm-up): the point here is a variance that follows the shrinking gradients.
0/1 Adam's local steps (skipped rounds) are not built: between rounds the ranks' parameters
differ, while ``sync=ddp``'s drift guard and evaluation rely on one model.

Bytes per step and rank: the warm-up's all-reduce, 2 (p-1)/p x 2 (bf16) or 4 (fp32) B/param;
the compression stage's two-phase collective, 2 (p-1) x B_c with B_c one chunk's payload
(n/p values: 1/8 B each for sign1 + 4 B per block): about 2 (p-1)/p x 0.127 B/param, 1/16
of a bf16 all-reduce at any p. The metrics carry ``variance_frozen`` (0 during the warm-up,
1 after), so the two phases' bytes can be told apart in ``metrics.jsonl``.

Under ``engine=fsdp2`` (``exchange_over``) each rank runs the above on its local shards (the
island's mean gradient, FSDP2's reduce-scatter) and the averages run over the replicate group:
m, v and the errors are 1/S of the model per rank; per-block scales and the two-phase chunks
are those of the local shard (the unsharded tensor's where shard sizes are multiples of
``block_size`` x the replica count); ``optim.grad_clip`` takes the island's norm (the shards'
squares added over the island: not bitwise the unsharded norm). The moments then differ between
an island's ranks, so they are not offered to the drift guard.

State (``state_dict``, per rank: the worker and server errors differ between ranks): m, v,
the step count, the errors. A skipped (non-finite) step never reaches ``apply``, so nothing
changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..comm import accounting
from ..comm.aggregator import CompressedAggregator
from ..errors import ConfigError, need, one_of
from ..tensors import local_shard, on_device
from .plugins import OPTIMIZERS, AdamWOptions, OwnUpdatePlugin

# optim.warmup_comm -> the compressor of the dense steps' gradient average and its collective
WARMUP_COMM = {"bf16": ("bf16", "auto"), "fp32": ("none", "auto"), "int8": ("int8", "two_phase")}


@dataclass
class OneBitAdamOptions(AdamWOptions):
    freeze_step: int = 48            # dense AdamW steps before the variance is frozen (1-bit Adam's freeze_step)
    warmup_comm: str = "bf16"        # bf16 | fp32: the gradient all-reduce of the dense steps | int8: two-phase
    compressor: str = "sign1"        # sign1 | int8: the momentum's compression after the freeze
    block_size: int = 2048           # values per scale of the compressor
    var_update_scaler: int = 0       # 0: v frozen for good (1-bit Adam) | kappa: 0/1 Adam's dense variance
                                     # refreshes after the warm-up, interval 2 doubled every kappa refreshes
    var_max_interval: int = 0        # 0: the interval doubles without end (0/1 Adam) | N: it stops at N steps

    def check(self) -> None:
        super().check()
        need(self.freeze_step >= 1, "freeze_step", self.freeze_step,
             "must be >= 1 (the frozen variance comes from the dense warm-up steps)")
        # measured (experiment=tiny, 2 ranks, val loss after 8 steps): freeze_step=1 74.6 (313 after
        # 3 steps), 2: 3.37, 3: 3.44, 6: 3.60
        need(self.freeze_step >= 2, "freeze_step", self.freeze_step,
             "diverges: a variance frozen after one step is one gradient squared, and the coordinates whose "
             "first gradient was near 0 then take steps of about lr * |m| / eps; use >= 2 (default 48)")
        need(self.var_update_scaler >= 0, "var_update_scaler", self.var_update_scaler,
             "must be >= 0 (0: no variance refreshes)")
        need(self.var_max_interval == 0 or self.var_max_interval >= 2, "var_max_interval", self.var_max_interval,
             "must be 0 (no cap) or >= 2 steps")
        one_of(self.warmup_comm, tuple(WARMUP_COMM), "warmup_comm")
        one_of(self.compressor, ("sign1", "int8"), "compressor")


def dense_step(t: int, freeze_step: int, kappa: int, max_interval: int = 0) -> bool:
    """Whether accepted step ``t`` (0-based) all-reduces the gradient and updates the variance:
    the first ``freeze_step`` steps, then (``kappa`` > 0) the refreshes of 0/1 Adam's T_v (Lu et
    al. 2022, Sec. 4.1; DeepSpeed ``ZeroOneAdam``: with n = t + 1, a refresh where n is a multiple
    of ``var_interval``, which doubles after every ``var_update_scaler`` = kappa refreshes):
    intervals 2, 4, 8, ... after the warm-up, up to ``max_interval`` if > 0 (a thinwire option:
    0/1 Adam's spacing grows without end). With ``freeze_step = kappa`` this is 0/1 Adam's T_v."""
    if t < freeze_step:
        return True
    if kappa <= 0:
        return False
    n, prev, interval = t + 1, freeze_step, 2
    while True:
        for _ in range(kappa):
            prev = (prev // interval + 1) * interval   # the next multiple of the interval
            if prev >= n:
                return prev == n
        interval = interval * 2 if max_interval <= 0 else min(interval * 2, max_interval)


def dense_count(t: int, freeze_step: int, kappa: int, max_interval: int = 0) -> int:
    """How many of the accepted steps 0..t-1 were dense (the variance's update count)."""
    return sum(dense_step(i, freeze_step, kappa, max_interval) for i in range(t))


@OPTIMIZERS.register("adam1bit")
class OneBitAdamPlugin(OwnUpdatePlugin):
    """``optim=adam1bit``: see the module docstring."""

    Config = OneBitAdamOptions
    needs_grad_allreduce = False     # the plugin all-reduces gradients (warm-up) or momentum itself
    per_rank_state = True            # worker and server errors differ between ranks
    exchanges_on_shards = True       # runs on local shards, averaging over the groups given (exchange_over)

    @staticmethod
    def shard_refusal(cfg) -> tuple | None:
        return None

    @classmethod
    def check_run(cls, cfg) -> None:
        if cfg.engine.name == "deepspeed":
            raise ConfigError("engine=deepspeed: optim=adam1bit compresses the whole first moment itself, but ZeRO "
                              "partitions the optimizer state and reduces gradients with its own collectives "
                              "(DeepSpeed's own 1-bit Adam never ran with ZeRO); use engine=ddp")

    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        self.meter = self.meter if self.meter is not None else accounting.WireMeter()
        self.island = None  # exchange_over: the ranks whose local shards make one gradient
        self._aggregators(None, getattr(self.world, "async_group", None))
        self.exp_avg = [torch.zeros_like(local_shard(p), dtype=torch.float32) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(local_shard(p), dtype=torch.float32) for p in self.params]
        self.t = 0                   # accepted steps (the bias corrections' t)
        self.n_var = 0               # variance updates so far (its bias correction's t)

    def _aggregators(self, group, group2) -> None:
        c = self.cfg
        name, collective = WARMUP_COMM[c.warmup_comm]
        self.dense = CompressedAggregator(name, {"feedback": "none", "collective": collective,
                                                 "block_size": c.block_size}, self.meter, group, group2)
        self.compressed = CompressedAggregator(c.compressor, {"feedback": "ef", "collective": "two_phase",
                                                              "block_size": c.block_size}, self.meter, group, group2)

    def exchange_over(self, replicas) -> None:
        """Average over ``replicas.cross_group`` (second phases on ``cross_group2``) and take the
        gradient norm over ``replicas.shard_group`` (``engine=fsdp2``'s ``Islands``)."""
        self.island = replicas.shard_group
        self._aggregators(replicas.cross_group, replicas.cross_group2)

    # -- one step --------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """Whether the next step is in the compression stage (variance frozen)."""
        c = self.cfg
        return not dense_step(self.t, c.freeze_step, c.var_update_scaler, c.var_max_interval)

    def _grads(self) -> list[torch.Tensor]:
        return [local_shard(p.grad).detach().float().reshape(-1) if p.grad is not None
                else torch.zeros(local_shard(p).numel(), dtype=torch.float32, device=p.device) for p in self.params]

    def _clip(self, grads: list[torch.Tensor]) -> float:
        """Scale ``grads`` in place to global norm <= grad_clip (torch's clip_grad_norm_ rule)."""
        if self.island is not None and accounting.group_size(self.island) > 1:  # local shards: the island's norm
            sq = torch.stack([g.double().pow(2).sum() for g in grads]).sum().reshape(1)
            accounting.all_reduce(self.meter, sq, group=self.island, kind="control")
            norm = sq.sqrt().float()[0]
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return float(norm)

    @torch.no_grad()
    def apply(self, step: int) -> dict[str, float]:
        c = self.cfg
        b1, b2 = c.betas
        lr = self.lr(step)
        out = {"lr": lr, "variance_frozen": float(self.frozen)}
        grads = self._grads()
        if not self.frozen:       # warm-up or variance refresh: AdamW on the mean gradient
            self.n_var += 1
            grads = self.dense.launch(self.names, grads, self.t).wait()
            self.dense.commit()
            stats = self.dense.take_stats()
            if c.grad_clip > 0:
                out["grad_norm"] = self._clip(grads)
            for g, m, v in zip(grads, self.exp_avg, self.exp_avg_sq):
                g = g.view(m.shape)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:                     # compression stage: the local momentum, averaged with error feedback
            if c.grad_clip > 0:
                out["grad_norm"] = self._clip(grads)
            local = [m.reshape(-1) * b1 + g * (1 - b1) for m, g in zip(self.exp_avg, grads)]
            means = self.compressed.launch(self.names, local, self.t).wait()
            self.compressed.commit()
            stats = self.compressed.take_stats()
            for m, mean in zip(self.exp_avg, means):
                m.copy_(mean.view(m.shape))
        self.t += 1
        bc1 = 1 - b1 ** self.t
        bc2_sqrt = math.sqrt(1 - b2 ** self.n_var)
        for p, m, v, decay in zip(self.params, self.exp_avg, self.exp_avg_sq, self.decay):
            p = local_shard(p)
            if decay and c.weight_decay:
                p.mul_(1 - lr * c.weight_decay)
            denom = (v.sqrt() / bc2_sqrt).add_(c.eps)
            p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bc1)
        out["compression_ratio"] = stats["compression_ratio"]
        return out

    # -- state ---------------------------------------------------------------------------
    def consensus_state(self) -> dict:
        """Both moments are identical on every rank (the warm-up steps on the mean gradient,
        the compressed stage on the decompressed mean first moment; the variance is frozen);
        on local shards (``exchange_over``) they differ inside an island: none offered."""
        if self.island is not None:
            return {}
        state = {f"exp_avg.{n}": m for n, m in zip(self.names, self.exp_avg)}
        state.update({f"exp_avg_sq.{n}": v for n, v in zip(self.names, self.exp_avg_sq)})
        return state

    def state_dict(self) -> dict:
        return {"t": self.t, "n_var": self.n_var,
                "exp_avg": {n: m.clone() for n, m in zip(self.names, self.exp_avg)},
                "exp_avg_sq": {n: v.clone() for n, v in zip(self.names, self.exp_avg_sq)},
                "errors": self.compressed.state_dict(), "dense_errors": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        c = self.cfg
        self.n_var = int(state.get("n_var", dense_count(self.t, c.freeze_step, c.var_update_scaler, c.var_max_interval)))
        for n, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            m.copy_(state["exp_avg"][n])
            v.copy_(state["exp_avg_sq"][n])
        device = self.exp_avg[0].device if self.exp_avg else torch.device("cpu")
        self.compressed.load_state_dict(on_device(state["errors"], device))
        if "dense_errors" in state:   # warmup_comm=int8: the two-phase collective's server errors
            self.dense.load_state_dict(on_device(state["dense_errors"], device))
