"""The outer loop (``sync=local|diloco|co2``, eager, streaming, SparseLoCo): one strategy that
runs a :class:`~thinwire.comm.rounds.Round` (plain data: fragments, offsets, delay, merge rule).
At fragment j's launch, on rank i (a: the anchor, equal on every rank; w_i: live parameters)::

    Delta_i = a - w_i ;  launch d = mean_i Delta_i     (one average, through the comm layer)

and ``delay`` steps later, at its merge (Local SGD, Lin et al. 2020; DiLoCo, Douillard et al.
2023; Streaming DiLoCo, arXiv 2501.18512, Alg. 1; CO2, Sun et al. 2024, Alg. 1)::

    sync:   a = OuterOpt(a, d);             w_i = alpha w_i + (1 - alpha) a
    stale:  a' = OuterOpt(a, d / Lambda);   w_i += a' - y_i   (y_i = a - Delta_i: w_i at the launch)
    eager:  a = OuterOpt(a, d) as soon as d arrives (the consensus: means only); at the launch,
            Delta_i = s_i - w_i  and  w_i = s_i = OuterOpt'(a, Delta_i / p)   (s_i: rank i's anchor)

Eager is Kale, Douillard, Donchev 2025 (arXiv 2502.12996) unrolled: own share at its round, the
others' one round later. Departure: with momentum the paper keeps one outer optimizer per worker;
OuterOpt' here is a copy of the consensus's state (``OuterOptimizer.trial``), equal on every rank.
Lambda = 1 + s ||a_t - a_{t-1}|| / ||d|| per layer (CO2 Eq. 4, Gap-Aware form). OuterOpt: any
torch optimizer after a clip (``outer_optimizer``); inner moments may be averaged at round ends.

Departures: Delta_i is a copy (the CO2 reference all-reduces live parameters from a thread);
pseudo-gradients are averaged, so any compressor + error feedback applies. A non-finite Delta
anywhere is agreed in one control all-reduce before the launch (it also carries Ctrl-C votes):
every rank restarts that fragment from its anchor and nothing is sent (``outer_skipped``). A
checkpoint completes the averages in flight and stores their means (resume is bitwise). While
ranks differ the model evaluated is the mean of the live parameters (eager: the consensus).
Parameters are read and written only through a ``ParamSpace``, averaged only over the
``Replicas`` groups given (``param_space``): ZeRO shards and subgroups are implementations.
On NCCL an overlapped average is launched from a side stream that first waits for compute.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ..errors import need
from . import accounting
from .averager import CompressedAverager
from .futures import then
from .moments import MomentAverager
from .outer_optimizer import OuterOptimizer, Placement, outer_spec, per_element
from .param_space import DataParallel, ModuleParams, Replicas, group_norm
from .rounds import CO2Config, LocalConfig, co2_options, round_of
from .sync import SYNC_STRATEGIES, SyncStrategy


def staleness_penalty(d_norms: list[float], move_norms: list[float] | None, strength: float) -> list[float]:
    """CO2's layer-wise Lambda >= 1 (module doc): 1 when off or before the anchor first moved."""
    if strength <= 0 or move_norms is None:
        return [1.0] * len(d_norms)
    return [1.0 + strength * move / d if d > 0 else 1.0 for d, move in zip(d_norms, move_norms)]


@dataclass
class Flight:  # one fragment's average: launched (snapshot Delta_i), waited for (mean), merged
    snapshot: torch.Tensor | None
    future: torch.futures.Future | None = None
    mean: torch.Tensor | None = None
    launched_s: float = 0.0
    done_s: float = 0.0


@SYNC_STRATEGIES.register("local")
class OuterStrategy(SyncStrategy):
    """Runs the round ``sync.*`` describes (module doc); ``sync=co2`` is :class:`CO2`."""
    Config = LocalConfig
    needs_grad_allreduce = False
    ranks_diverge = True
    carries_stop = True  # in the finiteness all-reduce of each synchronisation (finite_everywhere)
    supports_replica_groups = True   # averages a ParamSpace over the groups it is given

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas: Replicas | None = None):
        cfg = co2_options(cfg) if issubclass(self.Config, CO2Config) else cfg
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        self.replicas = replicas if replicas is not None else DataParallel(world)
        self.model_params = ModuleParams(model)  # what is evaluated
        self.space = self.replicas.shards(self.model_params)  # what is averaged
        self.plan = round_of(cfg, self.space.names)
        self.H, self.round, self.skipped = self.plan.steps, 0, 0
        live = self.space.read_flat()
        self.place = Placement(live.device, cfg.get("anchor_device"))  # sync.anchor_device
        self.anchor = self.space.split(self.place.store(live))
        spec, tuned = outer_spec(cfg.outer_optim, self.H, accounting.group_size(self.replicas.cross_group))
        if tuned and getattr(world, "is_main", True):
            print(f"thinwire: sync.outer_optim.lr={spec['lr']:g}: DiLoCo's outer lr for H={self.H} and "
                  f"{accounting.group_size(self.replicas.cross_group)} replicas (docs/sync.md); set "
                  "sync.outer_optim.lr to override", flush=True)
        self.outer = OuterOptimizer(self.anchor, cfg, norm=self.space.global_norm, spec=spec, place=self.place)
        self.averager = CompressedAverager(comm_cfg if comm_cfg is not None else {"name": "none"}, meter,
                                           group=self.replicas.cross_group, group2=self.replicas.cross_group2,
                                           timeout_s=getattr(world, "timeout_s", None))
        # inner moments: over the control group, or where the replicas shard them (engine=fsdp2) over
        # a group of the ranks holding the same shard, of its own (the cross group carries co2's average)
        moment_group = getattr(self.replicas, "moment_group", None)
        self.moments = MomentAverager(*self.plan.moments, meter, group=moment_group() if moment_group and any(
            self.plan.moments) else self.replicas.control_group)
        self.flights: dict[int, Flight] = {}
        self.live: torch.Tensor | None = None               # this step's w_i, read once
        self.last_step: dict[int, list[torch.Tensor]] = {}  # stale: fragment's a_t - a_{t-1}, for Lambda
        self.start = self.place.store(self.space.read_flat()) if self.plan.merge == "eager" else None  # eager: s_i
        self.overlapped = self.plan.delay == self.H and self.plan.merge != "sync"
        self.cuda_stream = (torch.cuda.Stream(device=world.device)
                            if self.overlapped and world.device.type == "cuda" else None)
        self.absence = None  # a planned absence (plan_absence)
        if self.place.staged and getattr(world, "is_main", True):
            print(f"thinwire: sync.anchor_device={self.place.home}: the outer loop's anchor "
                  f"({self.place.nbytes(self.anchor):,} bytes per rank), outer-optimizer state and CO2's last "
                  f"step kept on {self.place.home}{' (pinned)' if self.place.pin else ''} (the model's: "
                  f"{self.place.work}); metric anchor_device_bytes", flush=True)

    def plan_absence(self, absence) -> None:
        """``trainer.faults.absent_at`` (``thinwire.elastic.absence.PlannedAbsence``, checked there:
        F = 1, no delay, comm=none): in the rounds its slot is absent, that rank's parameters stay at
        the anchor (Delta = 0) and each round's mean divides by the live count."""
        self.absence = absence
        if absence.absent(self.world.rank, self.round):
            self.space.write_flat(self.space.flat(self.anchor))

    def _absent(self, rnd: int) -> bool:
        return self.absence is not None and self.absence.absent(self.world.rank, rnd)

    @classmethod
    def check_run(cls, cfg) -> None:
        s, engine, n_layer = cfg.sync, cfg.engine.name, cfg.model.get("n_layer")
        need(engine in ("ddp", "fsdp2") or (s.fragments == 1 and s.fragment_delay == 0), "sync.fragments",
             s.fragments, f"engine={engine} shards layers across a replica group's ranks; streaming fragments need "
             f"engine=ddp|fsdp2 (FSDP2: every rank holds a slice of every layer)")
        need(engine in ("ddp", "fsdp2") or s.moment1_every == s.moment2_every == 0, "sync.moment1_every",
             f"{s.moment1_every} (moment2_every={s.moment2_every})",
             f"engine={engine} shards the inner optimizer's state across a replica's ranks; averaging its moments "
             f"needs engine=ddp|fsdp2 (FSDP2: rank j of every island holds the same shard)")
        need(not isinstance(n_layer, int) or s.fragments <= n_layer, "sync.fragments", s.fragments,
             f"model.n_layer={n_layer} blocks: at most one fragment per block")

    def bind_optimizer(self, plugin) -> None:
        if self.moments.active:
            self.moments.bind(getattr(plugin, "optimizer", None))

    # -- pieces of fragment j ---------------------------------------------------------
    def _take(self, flat: torch.Tensor, j: int) -> torch.Tensor:
        if len(self.plan.fragments) == 1:
            return flat
        pieces = self.space.split(flat)
        return torch.cat([pieces[i].reshape(-1) for i in self.plan.fragments[j]])

    def _pieces(self, flat: torch.Tensor, j: int) -> list[torch.Tensor]:
        """Fragment j's flat vector as pieces shaped like its anchor's."""
        idx = self.plan.fragments[j]
        return [x.view_as(self.anchor[i]) for x, i in zip(flat.split([self.space.sizes[i] for i in idx]), idx)]

    def _live(self) -> torch.Tensor:
        if self.live is None:
            self.live = self.space.read_flat()
        return self.live

    def _write(self, j: int, pieces: list[torch.Tensor]) -> None:
        """w_i on fragment j's pieces = ``pieces``; the live parameters are written back."""
        live = self.space.split(self._live())
        for i, x in zip(self.plan.fragments[j], pieces):
            live[i].copy_(x.reshape(live[i].shape))
        self.space.write_flat(self.live)

    # -- the round ----------------------------------------------------------------------
    def after_step(self, step: int) -> dict[str, float]:
        s, self.live = step + 1, None
        out, wait = {}, 0.0
        for j in self.plan.merges(s):
            wait += self._wait(j, out) if j in self.flights else 0.0
            if j in self.flights:  # eager: merged when waited for
                self._merge(j, out)
        for j in self.plan.launches(s):
            t0 = time.perf_counter()
            if self._launch(j) and self.plan.delay == 0:
                self._wait(j, out)
                self._merge(j, out)
            wait += time.perf_counter() - t0
            if self.plan.streaming:
                out["fragment"] = j
        if s % self.H:
            return {**out, "comm_wait_s": wait, **self._averager_stats()} if out else {}
        self.round += 1
        self.moments.after_round(self.round)
        if not self.plan.streaming and not self.overlapped:
            out["overlap_fraction"] = 0.0
        if self.absence is not None:  # the membership tape of the round, and who sits out the next
            out.update(self.absence.round_metrics(self.round - 1))
            if self._absent(self.round):
                self.space.write_flat(self.space.flat(self.anchor))
        return self.metrics(wait, **out, **self._averager_stats())

    def _launch(self, j: int) -> bool:
        """Delta_i of fragment j, agreed finite, then launched (False: skipped everywhere)."""
        own = self.start if self.plan.merge == "eager" else self.space.flat(self.anchor)
        delta = self.place.fetch(self._take(own, j)) - self._take(self._live(), j)
        if not self.finite_everywhere(delta):
            self._write(j, self._pieces(self._take(own, j), j))  # restart the fragment from its anchor
            self.skipped += 1
            return False
        idx = self.plan.fragments[j]
        # co2 counts the round in flight as launched after the round it ends (comm.warmup_steps, seeds)
        self.launching = ([self.space.names[i] for i in idx], [self.space.sizes[i] for i in idx],
                          self.round + self.overlapped)
        flight = self.flights[j] = Flight(delta, launched_s=time.perf_counter())
        if self.cuda_stream is not None:  # NCCL: launch from the side stream
            self.cuda_stream.wait_stream(torch.cuda.current_stream(self.world.device))
            with torch.cuda.stream(self.cuda_stream):
                delta.record_stream(self.cuda_stream)
                fut = self.launch(delta)
        else:
            fut = self.launch(delta.clone() if self.start is not None else delta)
        flight.future = then(fut, lambda f: (setattr(flight, "done_s", time.perf_counter()), f.value())[1])
        if self.plan.merge == "eager":  # s_i = OuterOpt'(c, Delta_i / p): this rank's fresh share
            n = accounting.group_size(self.replicas.cross_group) if self.world.world_size > 1 else 1
            moved = self.outer.trial(self._pieces(delta.div(n), j), [self.anchor[i] for i in idx])
            for x, i in zip(moved, idx):
                self.space.split(self.start)[i].copy_(x)
            self._write(j, moved)
        return True

    def launch(self, delta: torch.Tensor) -> torch.futures.Future:
        """Start averaging ``delta``, the fragment being launched (a seam: tests slow it down)."""
        names, sizes, it = self.launching
        if self.absence is not None and self.averager.aggregator is not None:  # compressed: absence.LiveRows
            return self.absence.rows(self).average(self.world.rank, it, delta, self.meter, self.replicas.cross_group)
        if self.absence is not None:  # the mean over the live contributors (the absent one sends zeros)
            return self.averager.average_async(names, sizes, delta, it, len(self.absence.live(self.round)))
        return self.averager.average_async(names, sizes, delta, it)

    def _wait(self, j: int, out: dict) -> float:
        """Wait for fragment j's mean (eager: apply it to the consensus); returns seconds blocked."""
        f = self.flights[j]
        if f.future is None:  # restored from a checkpoint, or already waited for
            return 0.0
        consume_s = time.perf_counter()
        f.mean, f.future = f.future.wait(), None
        if self.cuda_stream is not None:
            torch.cuda.current_stream(self.world.device).wait_stream(self.cuda_stream)
        self.averager.commit([self.space.names[i] for i in self.plan.fragments[j]])  # only this fragment's
        if self.overlapped and f.done_s:
            hidden = max(0.0, min(f.done_s, consume_s) - f.launched_s)
            out["overlap_fraction"] = min(1.0, hidden / max(f.done_s - f.launched_s, 1e-9))
        if self.plan.merge == "eager":  # the consensus takes every mean as soon as it is waited for
            self.outer.step([self.anchor[i] for i in self.plan.fragments[j]],
                            [x.clone() for x in self._pieces(f.mean, j)])
            del self.flights[j]
        return time.perf_counter() - consume_s

    def _merge(self, j: int, out: dict) -> None:
        f, idx = self.flights.pop(j), self.plan.fragments[j]
        anchor, d = [self.anchor[i] for i in idx], [x.clone() for x in self._pieces(f.mean, j)]
        if self.plan.merge == "sync":
            self.outer.step(anchor, d)
            live = self._pieces(self._take(self._live(), j), j)
            a = self.plan.alpha
            self._write(j, anchor if a == 0 else [w.mul_(a).add_(self.place.fetch(x), alpha=1 - a)
                                                  for w, x in zip(live, anchor)])
            return
        last = self.last_step.get(j)
        last = None if last is None else [self.place.fetch(x) for x in last]  # norms on the model's device
        penalty = staleness_penalty(self.space.layer_norms(d), None if last is None else self.space.layer_norms(last),
                                    self.plan.penalty)
        out.update(staleness_gap_norm=self.space.global_norm(last) if last is not None else 0.0,
                   staleness_penalty_mean=sum(penalty) / len(penalty))
        step = self.outer.step(anchor, [x.div_(lam) for x, lam in zip(d, penalty)])
        self.last_step[j] = [self.place.store(x) for x in step]
        live = self._pieces(self._take(self._live(), j), j)  # w_i += a_{t+1} - y_i
        self._write(j, [w.add_(x).add_(y) for w, x, y in zip(live, step, self._pieces(f.snapshot, j))])

    def _averager_stats(self) -> dict[str, float]:
        """The averager's metrics; ``residual_norm`` over whole tensors where each rank holds a
        shard of every tensor (``Replicas.shard_group``: FSDP2's island)."""
        stats = self.averager.take_stats()
        if "residual_norm" in stats:
            stats["residual_norm"] = group_norm(stats["residual_norm"], getattr(self.replicas, "shard_group", None),
                                                self.meter, self.place.work)
        return stats

    def metrics(self, wait_s: float, **extra) -> dict[str, float]:
        momentum = self.outer.momentum()
        out = {"comm_wait_s": wait_s, "outer_round": self.round, "outer_clipped": self.outer.clipped,
               "outer_skipped": self.skipped,
               "outer_momentum_norm": self.space.global_norm([self.place.fetch(m) for m in momentum]), **extra}
        if self.place.staged:
            out["anchor_device_bytes"] = self.anchor_device_bytes()
        return out

    def anchor_device_bytes(self) -> int:
        """Bytes this rank keeps on ``sync.anchor_device`` (from tensor sizes): the anchor, the
        outer optimizer's per-element state, CO2's last steps, eager's start."""
        state = [v for p, st in self.outer.optimizer.state.items() for k, v in st.items() if per_element(p, k, v)]
        extra = [x for s in self.last_step.values() for x in s] + ([] if self.start is None else [self.start])
        return self.place.nbytes([*self.anchor, *state, *extra])

    def finite_everywhere(self, delta: torch.Tensor) -> bool:
        """Every rank's Delta finite? One control all-reduce over the control group, which also
        counts Ctrl-C votes (``carries_stop``): non-finite counts 1, a vote p + 1 (exact in fp32)."""
        group = self.replicas.control_group
        weight = accounting.group_size(group) + 1
        flag = torch.isfinite(delta).all().logical_not().float().reshape(1) + (weight if self.stop_vote else 0)
        if weight > 2:
            accounting.all_reduce(self.meter, flag, group=group, kind="control")
        total = int(float(flag))
        self.stop_agreed = self.stop_agreed or total >= weight
        return total % weight == 0

    @property
    def round_steps(self) -> int:
        return self.H

    def consensus_state(self) -> dict:
        """The anchor and the outer optimizer's state (live parameters legitimately differ)."""
        state = {f"anchor.{n}": a for n, a in zip(self.space.names, self.anchor)}
        for n, p in zip(self.space.names, self.outer.params):
            for key, value in sorted(self.outer.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(value):
                    state[f"outer.{key}.{n}"] = value
        return state

    @property
    def consensus_group(self):
        return self.replicas.consensus_group

    @contextlib.contextmanager
    def eval_model(self):
        """Eager: the consensus (means waited for and applied); else the replicas' mean of the live
        parameters (``Replicas.eval_space``: one counted all-reduce), swapped in for the duration."""
        eager = self.plan.merge == "eager"
        params, group = self.replicas.eval_space(self.model_params, self.space)
        if not eager and (self.world.world_size == 1 or accounting.group_size(group) == 1):
            yield self.model
            return
        if eager:  # the means in flight are part of the consensus
            self.close()
            params = self.space
        live = params.read_flat()
        mean = params.flat(self.anchor) if eager else live.clone()
        if not eager:  # replica groups: each counts as often as it has ranks
            if self._absent(self.round):  # a planned absence: the mean of the live replicas
                mean.zero_()
            accounting.all_reduce(self.meter, mean, group=group, kind="eval")
            mean.div_(accounting.group_size(group) if self.absence is None else len(self.absence.live(self.round)))
        params.write_flat(mean)
        try:
            yield self.model
        finally:
            params.write_flat(live)

    def close(self) -> None:
        for j in list(self.flights):
            self._wait(j, {})

    def state_dict(self) -> dict:
        self.close()  # a checkpoint holds finished means, never a live handle
        return {"round": self.round, "anchor": [a.clone() for a in self.anchor], "skipped": self.skipped,
                "outer": self.outer.state_dict(), "averager": self.averager.state_dict(),
                "flights": {j: (f.snapshot, f.mean) for j, f in self.flights.items()},
                "last_step": {j: [x.clone() for x in s] for j, s in self.last_step.items()},
                "start": None if self.start is None else self.start.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.skipped = state["round"], state["skipped"]
        for a, s in zip(self.anchor, state["anchor"]):
            a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.averager.load_state_dict(state["averager"])
        self.flights = {j: Flight(snap, mean=mean) for j, (snap, mean) in state["flights"].items()}
        self.last_step = {j: [self.place.store(x) for x in s] for j, s in state["last_step"].items()}
        self.start = None if state["start"] is None else self.place.store(state["start"])

    def load_consensus_state(self, state: dict) -> bool:
        """Another world size (``SyncStrategy.load_consensus_state``): the round counters, the
        anchor and the outer optimizer's state carry over (DiLoCo's outer step from a fresh
        anchor would pull the model back to its initialisation); error feedback, means in flight,
        CO2's last step and eager's start stay fresh. Not when the averaged space is sharded by
        the world (its shapes changed): then nothing is restored."""
        if [a.shape for a in self.anchor] != [s.shape for s in state["anchor"]]:
            return False
        self.round, self.skipped = state["round"], state["skipped"]
        for a, s in zip(self.anchor, state["anchor"]):
            a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        if self.start is not None:  # eager: this round's start is where the replicas restart
            self.start = self.place.store(self.space.read_flat())
        return True


@SYNC_STRATEGIES.register("co2")
class CO2(OuterStrategy):
    """``sync=co2``: each fragment's average overlaps a round (``sync.overlap``: stale | eager)."""
    Config = CO2Config
