"""Local updates (``sync=local``): an outer loop over rounds of H local steps (Local SGD,
Lin et al. 2020; DiLoCo's outer loop, Douillard et al. 2023)::

    every rank runs H inner steps on its own optimizer, no gradient all-reduce;
    Delta_t^i = a_t - w_i                      (this rank's pseudo-gradient)
    d_t = mean_i Delta_t^i                     (one all-reduce, through the comm layer)
    a_{t+1} = OuterOpt(a_t, d_t)               (any torch optimizer; SGD by default)
    w_i = a_{t+1}                              (all ranks identical after the round)

``sync=co2`` (``.co2``) builds on this class: the same round, with the all-reduce overlapping
the next round. ``sync.fragments`` > 1 or ``sync.fragment_delay`` > 0 is Streaming DiLoCo
(``.streaming``); ``sync.moment1_every`` / ``moment2_every`` average the inner optimizer's
moments (``.moments``); the outer optimizer is ``.outer_optimizer``. The snapshot is
a copy: the collective never touches live parameters (the reference code all-reduces
them in place from a Python thread). Pseudo-gradients, not parameters, are averaged, so
any compressor + error feedback of the comm layer applies to them unchanged, with its own
per-rank state (``CompressedAverager``). Parameters are read and written through a
:class:`ParamSpace` (``ModuleParams``: the module's parameters; under ZeRO replica groups this
rank's shard of the fp32 master weights, ``thinwire.trainer.zero_replicas.ZeroShards``).

While ranks differ (mid-round for ``local``, always for ``co2``), the model evaluated,
sampled from and reported is the *mean of the ranks' live parameters* (one exact fp32
all-reduce per evaluation, counted as control traffic); checkpoints keep every rank's own
parameters, inner optimizer, anchor, outer momentum and round state.

Non-finite pseudo-gradients are agreed before the exchange: at the end of a round every rank
puts one flag (its Delta_t^i has a NaN or an infinity) into one small all-reduce, counted as
control traffic. If any rank raised it, every rank skips the round: nothing is compressed or
sent, no error-feedback buffer, outer momentum or anchor changes, every rank restarts from
the anchor (``outer_skipped`` counts such rounds). Without it, one rank's NaN would reach
every rank through the average (or, with a sparse compressor, only the coordinates it sent).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from ..errors import need, one_of
from . import accounting
from .averager import CompressedAverager
from .moments import MomentAverager
from .outer_optimizer import OuterOptimizer, build_outer_optimizer, default_outer_optim
from .param_space import ModuleParams, ParamSpace, Replicas
from .streaming import FragmentStreaming
from .sync import SYNC_STRATEGIES, SyncStrategy


@dataclass
class LocalConfig:
    """Options of ``sync=local`` (and, with the staleness penalty, ``sync=co2``)."""
    local_steps: int = 4             # H: inner steps per round
    # the outer optimizer on the anchor: any torch optimizer (``_target_`` + its keyword
    # arguments), as torchft's DiLoCo takes one. lr 1, no momentum = parameter averaging;
    # DiLoCo: lr 0.7, momentum 0.9, nesterov (``sync=diloco``)
    outer_optim: dict = field(default_factory=default_outer_optim)
    clip: float = 1.0                # pseudo-gradient clipping threshold (> 0), before the outer step
    clip_mode: str = "norm"          # norm (global L2 norm of the pseudo-gradient) | value (per element)
    # Streaming DiLoCo (arXiv 2501.18512): F fragments of strided blocks, synchronised at staggered steps
    fragments: int = 1               # F (must divide local_steps; 1 = the whole model at once)
    fragment_delay: int = 0          # tau: inner steps a fragment's all-reduce overlaps (< local_steps / F)
    fragment_alpha: float = 0.0      # merge: alpha * local + (1 - alpha) * global (0 = take the global)
    # DES-LOC (arXiv 2505.22549): average the inner optimizer's moments across ranks
    moment1_every: int = 0           # K_u: first moment (AdamW exp_avg / SGD momentum) every K_u rounds (0 = never)
    moment2_every: int = 0           # K_v: second moment (AdamW exp_avg_sq) every K_v rounds (0 = never)
    allows_inf = ("clip",)           # clip=.inf: no clipping (every other float option must be finite)

    def check(self) -> None:
        need(self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1")
        need(self.clip > 0, "clip", self.clip, "must be positive (pseudo-gradient clipping threshold)")
        one_of(self.clip_mode, ("norm", "value"), "clip_mode")
        build_outer_optimizer([torch.zeros(1)], self.outer_optim)
        need(self.fragments >= 1, "fragments", self.fragments, "must be >= 1")
        need(self.local_steps % self.fragments == 0, "fragments", self.fragments,
             f"must divide local_steps={self.local_steps} (fragments synchronise at staggered steps of a round)")
        need(0 <= self.fragment_delay < self.local_steps // self.fragments, "fragment_delay", self.fragment_delay,
             f"must be in [0, local_steps/fragments={self.local_steps // self.fragments}): a fragment's "
             f"all-reduce must finish before that fragment is reduced again")
        need(0.0 <= self.fragment_alpha <= 1.0, "fragment_alpha", self.fragment_alpha, "must be in [0, 1]")
        need(self.moment1_every >= 0, "moment1_every", self.moment1_every, "must be >= 0 (0 = never)")
        need(self.moment2_every >= 0, "moment2_every", self.moment2_every, "must be >= 0 (0 = never)")


@SYNC_STRATEGIES.register("local")
class LocalUpdates(FragmentStreaming, SyncStrategy):
    """``sync=local``: H local steps, then a synchronous outer step (see module doc); with
    streaming fragments, ``FragmentStreaming.stream_step`` runs the round instead."""
    Config = LocalConfig
    needs_grad_allreduce = False
    ranks_diverge = True
    carries_stop = True  # in the finiteness all-reduce of each synchronisation (finite_everywhere)
    supports_replica_groups = True   # averages parameters, so it can run across ZeRO replica groups

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas: Replicas | None = None):
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        self.H = cfg.local_steps
        self.replicas = replicas
        self.round = 0
        self.model_params: ModuleParams = ModuleParams(model)  # the model's parameters: what is evaluated
        # the space averaged across replicas: the model's parameters, or under ZeRO replica
        # groups this rank's shard of the fp32 master weights
        self.space: ParamSpace = replicas.shards(self.model_params) if replicas is not None else self.model_params
        group, group2 = ((replicas.cross_group, replicas.cross_group2) if replicas is not None
                         else (world.async_group if world.world_size > 1 else None, None))
        self.anchor = self.space.split(self.space.read_flat())
        self.outer = OuterOptimizer(self.anchor, cfg, norm=self.space.global_norm)
        self.averager = CompressedAverager(comm_cfg if comm_cfg is not None else {"name": "none"},
                                           meter, group=group, group2=group2)
        self.skipped = 0  # rounds skipped because some rank's pseudo-gradient was not finite
        opt = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(LocalConfig)
               if f.name.startswith(("fragment", "moment"))}  # configs built by hand may leave them out
        self.moments = MomentAverager(opt["moment1_every"], opt["moment2_every"], meter)
        # streaming fragments (``thinwire.comm.streaming``): at most one fragment's mean in flight
        self.init_streaming(opt["fragments"], opt["fragment_delay"], opt["fragment_alpha"])

    @classmethod
    def check_run(cls, cfg) -> None:
        s = cfg.sync
        if cfg.engine.name != "ddp":
            need(s.fragments == 1 and s.fragment_delay == 0, "sync.fragments", s.fragments,
                 f"engine={cfg.engine.name} shards layers across a replica group's ranks; streaming fragments "
                 f"need engine=ddp")
            need(s.moment1_every == 0 and s.moment2_every == 0, "sync.moment1_every",
                 f"{s.moment1_every} (moment2_every={s.moment2_every})",
                 f"engine={cfg.engine.name} shards the inner optimizer's state; averaging its moments needs engine=ddp")
        n_layer = cfg.model.get("n_layer")
        if isinstance(n_layer, int) and s.fragments > 1:
            need(s.fragments <= n_layer, "sync.fragments", s.fragments,
                 f"model.n_layer={n_layer} blocks: at most one fragment per block")

    def bind_optimizer(self, plugin) -> None:
        if self.moments.active:
            self.moments.bind(getattr(plugin, "optimizer", None))

    # -- pieces shared with CO2 ----------------------------------------------------
    def pseudo_gradient(self, live: torch.Tensor | None = None) -> torch.Tensor:
        """Delta^i = a - w_i, flattened (a fresh buffer: the snapshot); ``live``: w_i if at hand."""
        return self.space.flat(self.anchor) - (self.space.read_flat() if live is None else live)

    def launch(self, delta: torch.Tensor) -> torch.futures.Future:
        return self.averager.average_async(self.space.names, self.space.sizes, delta, self.round)

    def outer_step(self, mean_delta: torch.Tensor, penalty: list[float] | None = None) -> list[torch.Tensor]:
        d = [x.clone() for x in self.space.split(mean_delta)]
        if penalty is not None:
            for x, lam in zip(d, penalty):
                x.div_(lam)
        return self.outer.step(self.anchor, d)

    def metrics(self, wait_s: float, **extra) -> dict[str, float]:
        return {"comm_wait_s": wait_s, "outer_round": self.round, "outer_clipped": self.outer.clipped,
                "outer_skipped": self.skipped,
                "outer_momentum_norm": self.space.global_norm(self.outer.momentum()), **extra}

    def finite_everywhere(self, delta: torch.Tensor) -> bool:
        """Whether every rank's pseudo-gradient is finite: one control all-reduce of a flag
        over all ranks (replica groups included: they must all skip together). The same
        number carries the ranks' Ctrl-C votes (``SyncStrategy.carries_stop``): a non-finite
        rank counts 1, a vote world size + 1 (exact in float32 below 4096 ranks); every rank
        reads the same sum."""
        weight = self.world.world_size + 1
        bad = torch.isfinite(delta).all().logical_not().float().reshape(1)
        flag = bad + (weight if self.stop_vote else 0)
        if self.world.world_size > 1:
            accounting.all_reduce(self.meter, flag, kind="control")
        total = int(float(flag))
        self.stop_agreed = self.stop_agreed or total >= weight
        return total % weight == 0

    def skip_round(self) -> None:
        """A round with a non-finite pseudo-gradient somewhere: every rank restarts from the
        unchanged anchor; nothing was sent, so error feedback and outer state are untouched."""
        self.space.write_flat(self.space.flat(self.anchor))
        self.skipped += 1

    # -- the strategy ----------------------------------------------------------------
    def after_step(self, step: int) -> dict[str, float]:
        if self.streaming:
            return self.stream_step(step)
        if (step + 1) % self.H != 0:
            return {}
        t0 = time.perf_counter()
        delta = self.pseudo_gradient()
        if not self.finite_everywhere(delta):
            self.skip_round()
            self.round += 1
            return self.metrics(time.perf_counter() - t0, overlap_fraction=0.0)
        mean = self.averager.average(self.space.names, self.space.sizes, delta, self.round)
        self.averager.commit()
        wait = time.perf_counter() - t0
        self.outer_step(mean)
        self.space.write_flat(self.space.flat(self.anchor))
        self.round += 1
        self.moments.after_round(self.round)
        stats = self.averager.take_stats()
        return self.metrics(wait, overlap_fraction=0.0, **stats)

    @property
    def round_steps(self) -> int:
        return self.H

    def consensus_state(self) -> dict:
        """After an outer step every rank holds the same anchor and outer optimizer state
        (live parameters legitimately differ under CO2)."""
        state = {f"anchor.{n}": a for n, a in zip(self.space.names, self.anchor)}
        for n, p in zip(self.space.names, self.outer.params):
            for key, value in sorted(self.outer.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(value):
                    state[f"outer.{key}.{n}"] = value
        return state

    @property
    def consensus_group(self):
        return self.replicas.cross_group if self.replicas is not None else None

    @contextlib.contextmanager
    def eval_model(self):
        """The mean of the ranks' live parameters, swapped in for the duration."""
        if self.world.world_size == 1:
            yield self.model
            return
        live = self.model_params.read_flat()
        mean = live.clone()
        accounting.all_reduce(self.meter, mean, kind="eval")
        mean.div_(self.world.world_size)  # replica groups: every group counts as often as it has ranks
        self.model_params.write_flat(mean)
        try:
            yield self.model
        finally:
            self.model_params.write_flat(live)

    def close(self) -> None:
        self._complete_fragment()

    def state_dict(self) -> dict:
        self._complete_fragment()  # a fragment in flight is stored as its finished mean
        state = {"round": self.round, "anchor": [a.clone() for a in self.anchor], "skipped": self.skipped,
                 "outer": self.outer.state_dict(), "averager": self.averager.state_dict()}
        if self.streaming:
            state["fragment"] = {"pending": self.pending, "mean": self.pending_mean}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.skipped = state.get("skipped", 0)  # absent from checkpoints of earlier versions
        for a, s in zip(self.anchor, state["anchor"]):
            a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.averager.load_state_dict(state["averager"])
        if self.streaming:
            self.pending, self.pending_mean = state["fragment"]["pending"], state["fragment"]["mean"]

