"""Local updates and CO2: an outer loop over rounds of H local steps.

``sync=local`` (Local SGD / DiLoCo outer loop, Lin et al. 2020; Douillard et al. 2023)::

    every rank runs H inner steps on its own optimizer, no gradient all-reduce;
    Delta_t^i = a_t - w_i                      (this rank's pseudo-gradient)
    d_t = mean_i Delta_t^i                     (one all-reduce, through the comm layer)
    a_{t+1} = OuterOpt(a_t, d_t)               (any torch optimizer; SGD by default)
    w_i = a_{t+1}                              (all ranks identical after the round)

``sync=co2`` (Sun et al. 2024, "CO2", Algorithm 1): the all-reduce of round t runs
while round t+1 computes and is consumed at the end of round t+1, one round stale::

    end of round t+1:  d_t = mean_i Delta_t^i            (wait for the in-flight average)
                       d_t <- d_t / Lambda_t             (staleness-gap penalty)
                       a_{t+1} = OuterOpt(a_t, clip(d_t))
                       w_i += a_{t+1} - y_t^i            (keep round t+1's own progress)
                       Delta_{t+1}^i = a_{t+1} - w_i     (snapshot, then launch its average)

with y_t^i = a_t - Delta_t^i the rank's parameters at the end of round t. The snapshot is
a copy: the collective never touches live parameters (the reference code all-reduces
them in place from a Python thread). Pseudo-gradients, not parameters, are averaged, so
any compressor + error feedback of the comm layer applies to them unchanged, with its own
per-rank state (``CompressedAverager``). Parameters are read and written through a
:class:`ParamSpace` (``ModuleParams``: the module's parameters; under ZeRO replica groups this
rank's shard of the fp32 master weights, ``thinwire.trainer.zero_replicas.ZeroShards``).

Overlap: on gloo the average is an async work on ``world.async_group`` (a process group
of its own, so its order never interleaves with the per-step control all-reduce); its
``Future`` callbacks decompress on gloo's thread while the main thread computes. On NCCL
the snapshot is taken and the collective launched from a side CUDA stream that first
waits for the compute stream; before consuming, the compute stream waits for the side
stream, and the snapshot buffer is recorded on it so the allocator cannot reuse it early.

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
Under CO2 the check runs before the snapshot is launched; the round that was in flight is
consumed as usual, since it passed its own check.

A checkpoint taken while an average is in flight first completes it (waits, commits the
error-feedback update) and stores the finished mean; the resumed run consumes that mean
at the end of the round exactly as the uninterrupted run does, so resume is bitwise exact
on CPU. Waiting early changes only timing, never values.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import ConfigError, need, one_of
from . import accounting
from .averager import CompressedAverager
from .sync import SYNC_STRATEGIES, SyncStrategy


def default_outer_optim(momentum: float = 0.0, nesterov: bool = False) -> dict:
    return {"_target_": "torch.optim.SGD", "lr": 1.0, "momentum": momentum, "nesterov": nesterov}


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
    allows_inf = ("clip",)           # clip=.inf: no clipping (every other float option must be finite)

    def check(self) -> None:
        need(self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1")
        need(self.clip > 0, "clip", self.clip, "must be positive (pseudo-gradient clipping threshold)")
        one_of(self.clip_mode, ("norm", "value"), "clip_mode")
        build_outer_optimizer([torch.zeros(1)], self.outer_optim)


@dataclass
class CO2Config(LocalConfig):
    outer_optim: dict = field(default_factory=lambda: default_outer_optim(momentum=0.5, nesterov=True))
    # Lambda = 1 + s * ||anchor move|| / ||pseudo-gradient||, per layer (0 = off)
    staleness_penalty: float = 0.5

    def check(self) -> None:
        super().check()
        need(self.staleness_penalty >= 0, "staleness_penalty", self.staleness_penalty, "must be >= 0 (0 = off)")


def build_outer_optimizer(params: list[torch.Tensor], spec) -> torch.optim.Optimizer:
    """The torch optimizer ``spec`` (``{"_target_": "torch.optim.SGD", "lr": 0.7, ...}``)
    over ``params``; a bad target or argument raises ConfigError naming ``outer_optim``."""
    from hydra.utils import get_class

    spec = dict(spec)
    target = spec.pop("_target_", None)
    need(target is not None, "outer_optim._target_", target, "name a torch optimizer class, e.g. torch.optim.SGD")
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"outer_optim._target_={target}: not an importable class") from None
    need(isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), "outer_optim._target_", target,
         "must be a torch.optim.Optimizer subclass")
    try:
        return cls(params, **spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"outer_optim={dict(spec, _target_=target)}: {e}") from None


class OuterOptimizer:
    """The outer step on the anchor ``a`` (one fp32 tensor per piece of the space)::

        u_t = clip(d_t)                   (norm clip by default, or per element)
        a_{t+1} = Opt(a_t, grad = u_t)    (any torch optimizer; default torch.optim.SGD)

    With SGD this is the CO2 paper's outer momentum (Eq. 3): m_t = beta m_{t-1} + u_t,
    a_{t+1} = a_t - alpha (u_t + beta m_t) with Nesterov, a_t - alpha m_t without, and
    DiLoCo's outer optimizer (Douillard et al. 2023: SGD, Nesterov 0.9, lr 0.7); torchft's
    ``DiLoCo`` likewise takes the outer optimizer from the user. CO2's staleness penalty
    (``staleness_penalty``) and clipping are pre-steps on d_t, so they compose with any
    optimizer. CO2's "outer momentum clipping": the public reference computes an element-wise
    ``torch.clamp`` and discards the result (a no-op); here the clip is applied: by default
    the global L2 norm of ``d_t`` is scaled down to ``clip`` when larger (``clip_mode=norm``),
    or each element is clamped to ``[-clip, clip]`` (``clip_mode=value``).

    ``step`` returns the move a_{t+1} - a_t that the optimizer made (CO2 adds it to the
    live parameters). With the shipped SGD settings (lr 1) the anchor is bit-for-bit what
    the hand-written outer SGD of earlier versions computed.
    """

    def __init__(self, params: list[torch.Tensor], cfg, norm=None):
        self.norm = norm or global_norm  # the global L2 norm (a sharded space reduces it over its group)
        self.clip, self.clip_mode = cfg.clip, cfg.clip_mode
        self.params = params
        self.optimizer = build_outer_optimizer(params, cfg.outer_optim)
        self.clipped = 0

    def clip_(self, d: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.clip_mode == "value":
            self.clipped += 1 if any(bool((x.abs() > self.clip).any()) for x in d) else 0
            return [x.clamp_(-self.clip, self.clip) for x in d]
        norm = self.norm(d)
        if norm > self.clip:
            self.clipped += 1
            scale = self.clip / (norm + 1e-12)
            for x in d:
                x.mul_(scale)
        return d

    @torch.no_grad()
    def step(self, anchor: list[torch.Tensor], d: list[torch.Tensor]) -> list[torch.Tensor]:
        """Update ``anchor`` (the tensors this optimizer was built on) in place with the
        pseudo-gradient ``d``; returns the applied step (a_{t+1} - a_t) per tensor."""
        before = [a.clone() for a in anchor]
        for a, g in zip(anchor, self.clip_(d)):
            a.grad = g
        self.optimizer.step()
        for a in anchor:
            a.grad = None
        return [a - b for a, b in zip(anchor, before)]

    def momentum(self) -> list[torch.Tensor]:
        """The optimizer's first-moment buffers (SGD's ``momentum_buffer``, Adam's ``exp_avg``)."""
        out = []
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            buf = st.get("momentum_buffer", st.get("exp_avg"))
            out.append(buf if buf is not None else torch.zeros_like(p))
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "clipped": self.clipped}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.clipped = state["clipped"]


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def staleness_penalty(pseudo_grad_norms: list[float], anchor_move_norms: list[float] | None,
                      strength: float) -> list[float]:
    """Layer-wise staleness-gap penalty Lambda_t >= 1 (CO2 paper Sec. 3.2, Eq. 4, in the
    Gap-Aware form of Barkai et al. 2020 that it builds on)::

        Lambda_t^(l) = 1 + strength * ||a_t^(l) - a_{t-1}^(l)|| / ||d_t^(l)||

    The stale pseudo-gradient d_t was computed by ranks that had not yet seen the anchor
    move from a_{t-1} to a_t; the gap is that move, measured in units of the update
    itself, so a layer whose anchor moved by a whole pseudo-gradient since is damped by
    1 + strength. Both norms are identical on every rank (the anchor and the mean are),
    so the anchor stays identical. ``strength=0`` or the first round (no move yet,
    ``anchor_move_norms`` None): Lambda = 1. Arguments are the layers' norms
    (``ParamSpace.layer_norms``), one per piece: ``pseudo_grad_norms`` of d_t,
    ``anchor_move_norms`` of a_t - a_{t-1}.
    """
    if strength <= 0 or anchor_move_norms is None:
        return [1.0] * len(pseudo_grad_norms)
    return [1.0 + strength * move / d if d > 0 else 1.0 for d, move in zip(pseudo_grad_norms, anchor_move_norms)]


class ParamSpace(Protocol):
    """The parameters the outer loop reads, writes and averages, as named pieces.

    ``names[i]``/``sizes[i]``: piece i's name (layer-wise compression and error-feedback
    state are keyed by it) and element count; ``read_flat()`` a fresh fp32 vector of all
    pieces, ``write_flat(flat)`` its inverse; ``split(flat)`` views of the pieces,
    ``flat(pieces)`` a fresh fp32 concatenation; ``layer_norms(pieces)`` each piece's
    layer's L2 norm (a piece may be a fragment of a layer), ``global_norm(pieces)`` the
    norm of the whole space, identical on the ranks that share it.

    Implemented by :class:`ModuleParams` (the module's trainable parameters) and, under
    ZeRO replica groups, by ``thinwire.trainer.zero_replicas.ZeroShards`` (this rank's
    shard of the fp32 master weights: pieces are the fragments of the layers inside the
    shard, norms are reduced over the group)."""

    names: list[str]
    sizes: list[int]

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]: ...

    def read_flat(self) -> torch.Tensor: ...

    def write_flat(self, flat: torch.Tensor) -> None: ...

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]: ...

    def global_norm(self, pieces: list[torch.Tensor]) -> float: ...


class ModuleParams(ParamSpace):
    """The :class:`ParamSpace` of a module's trainable parameters: one piece per parameter,
    named by it; ``layer_norms`` is each parameter's norm."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sizes = [p.numel() for p in self.params]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [x.view_as(p) for x, p in zip(flat.split(self.sizes), self.params)]

    def read_flat(self) -> torch.Tensor:
        return self.flat(self.params)

    @torch.no_grad()
    def write_flat(self, flat: torch.Tensor) -> None:
        for p, x in zip(self.params, self.split(flat)):
            p.copy_(x)

    def layer_norms(self, pieces: list[torch.Tensor]) -> list[float]:
        return [float(t.norm()) for t in pieces]

    def global_norm(self, pieces: list[torch.Tensor]) -> float:
        return global_norm(pieces)


class Replicas(Protocol):
    """Groups of ranks that each hold one replica of the model, sharded inside the group
    (``engine=deepspeed`` with ``sync=local|co2``); the outer loop averages across them.

    ``cross_group``: the ranks that hold the same shard as this rank, one per replica (the
    outer average runs on it); ``cross_group2``: a second group over the same ranks for the
    two-phase collective's second phase (None when the comm config does not use it);
    ``shards(model_params)``: the :class:`ParamSpace` of this rank's shard.

    Implemented by ``thinwire.trainer.zero_replicas.ReplicaGroups``."""

    cross_group: object
    cross_group2: object

    def shards(self, model_params: ModuleParams) -> ParamSpace: ...


@SYNC_STRATEGIES.register("local")
class LocalUpdates(SyncStrategy):
    """``sync=local``: H local steps, then a synchronous outer step (see module doc)."""
    Config = LocalConfig
    needs_grad_allreduce = False
    ranks_diverge = True
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
        self.cuda_stream = torch.cuda.Stream(device=world.device) if world.device.type == "cuda" else None
        self.skipped = 0  # rounds skipped because some rank's pseudo-gradient was not finite

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
        over all ranks (replica groups included: they must all skip together)."""
        flag = torch.isfinite(delta).all().logical_not().float().reshape(1)
        if self.world.world_size > 1:
            accounting.all_reduce(self.meter, flag, kind="control")
        return float(flag) == 0.0

    def skip_round(self) -> None:
        """A round with a non-finite pseudo-gradient somewhere: every rank restarts from the
        unchanged anchor; nothing was sent, so error feedback and outer state are untouched."""
        self.space.write_flat(self.space.flat(self.anchor))
        self.skipped += 1

    # -- the strategy ----------------------------------------------------------------
    def after_step(self, step: int) -> dict[str, float]:
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

    def state_dict(self) -> dict:
        return {"round": self.round, "anchor": [a.clone() for a in self.anchor], "skipped": self.skipped,
                "outer": self.outer.state_dict(), "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.skipped = state.get("skipped", 0)  # absent from checkpoints of earlier versions
        for a, s in zip(self.anchor, state["anchor"]):
            a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.averager.load_state_dict(state["averager"])


@SYNC_STRATEGIES.register("co2")
class CO2(LocalUpdates):
    """``sync=co2``: the outer average of round t overlaps round t+1 (see module doc)."""
    Config = CO2Config

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas=None):
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        self.penalty_strength = cfg.staleness_penalty
        self.snapshot: torch.Tensor | None = None    # Delta_t^i of the round in flight
        self.future: torch.futures.Future | None = None
        self.mean: torch.Tensor | None = None         # its result, once waited for
        self.launched_s = self.done_s = 0.0
        self.last_step: list[torch.Tensor] | None = None  # a_t - a_{t-1}, for the gap penalty

    def _launch(self, snapshot: torch.Tensor) -> None:
        self.snapshot = snapshot
        self.launched_s, self.done_s = time.perf_counter(), 0.0  # done_s: set on gloo's thread
        if self.cuda_stream is not None:  # NCCL: launch from the side stream
            self.cuda_stream.wait_stream(torch.cuda.current_stream(self.world.device))
            with torch.cuda.stream(self.cuda_stream):
                self.snapshot.record_stream(self.cuda_stream)
                fut = self.launch(self.snapshot)
        else:
            fut = self.launch(self.snapshot)
        self.future = fut.then(self._mark_done)

    def _mark_done(self, fut: torch.futures.Future) -> torch.Tensor:
        self.done_s = time.perf_counter()
        return fut.value()

    def _complete(self) -> float:
        """Wait for the in-flight average (if any); returns the seconds spent blocked."""
        if self.future is None:
            return 0.0
        t0 = time.perf_counter()
        self.mean = self.future.wait()
        if self.cuda_stream is not None:
            torch.cuda.current_stream(self.world.device).wait_stream(self.cuda_stream)
        self.averager.commit()
        self.future = None
        return time.perf_counter() - t0

    def after_step(self, step: int) -> dict[str, float]:
        if (step + 1) % self.H != 0:
            return {}
        consume_s = time.perf_counter()
        wait = self._complete()
        out: dict[str, float] = {}
        live = None
        if self.mean is not None:
            if self.done_s and self.launched_s:  # not known for a mean restored from a checkpoint
                hidden = max(0.0, min(self.done_s, consume_s) - self.launched_s)
                out["overlap_fraction"] = min(1.0, hidden / max(self.done_s - self.launched_s, 1e-9))
            gap = self.space.global_norm(self.last_step) if self.last_step is not None else 0.0
            move_norms = self.space.layer_norms(self.last_step) if self.last_step is not None else None
            penalty = staleness_penalty(self.space.layer_norms(self.space.split(self.mean)), move_norms,
                                        self.penalty_strength)
            self.last_step = self.outer_step(self.mean, penalty)
            # w_i += a_{t+1} - y_t^i, with y_t^i = a_t - Delta_t^i
            live = self.space.read_flat().add_(self.space.flat(self.last_step)).add_(self.snapshot)
            self.space.write_flat(live)
            self.mean, self.snapshot = None, None
            out.update(staleness_gap_norm=gap, staleness_penalty_mean=sum(penalty) / len(penalty))
        self.round += 1
        t0 = time.perf_counter()
        delta = self.pseudo_gradient(live)  # Delta_{t+1}^i, agreed finite before it is launched
        if self.finite_everywhere(delta):
            self._launch(delta)
        else:
            self.skip_round()
        wait += time.perf_counter() - t0
        return self.metrics(wait, **out, **self.averager.take_stats())

    def close(self) -> None:
        self._complete()

    def state_dict(self) -> dict:
        self._complete()  # a checkpoint holds the finished mean, never a live handle
        state = super().state_dict()
        state.update({"snapshot": self.snapshot, "mean": self.mean,
                      "last_step": None if self.last_step is None else [s.clone() for s in self.last_step]})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.snapshot, self.mean, self.last_step = state["snapshot"], state["mean"], state["last_step"]
        self.future, self.launched_s, self.done_s = None, 0.0, 0.0
