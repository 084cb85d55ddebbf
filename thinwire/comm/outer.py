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

with y_t^i = a_t - Delta_t^i the rank's parameters at the end of round t. ``sync.overlap=eager``
applies the average as soon as it arrives and steps each rank with an estimate built from its
own fresh pseudo-gradient (Kale et al. 2025; see ``CO2``). ``sync=local`` with
``sync.fragments`` > 1 or ``sync.fragment_delay`` > 0 is Streaming DiLoCo (``.streaming``);
``sync.moment1_every`` / ``moment2_every`` average the inner optimizer's moments (``.moments``). The snapshot is
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
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from ..errors import ConfigError, need, one_of
from . import accounting
from .averager import CompressedAverager
from .moments import MomentAverager
from .streaming import FragmentSchedule, strided_fragments
from .sync import SYNC_STRATEGIES, SyncStrategy


def default_outer_optim(momentum: float = 0.0, nesterov: bool = False, lr: float = 1.0) -> dict:
    return {"_target_": "torch.optim.SGD", "lr": lr, "momentum": momentum, "nesterov": nesterov}


# CO2's outer recipe (Sun et al. 2024: Nesterov 0.5, lr 1); DiLoCo's (Nesterov 0.9, lr 0.7) is
# configs/sync/diloco.yaml
CO2_RECIPE = default_outer_optim(momentum=0.5, nesterov=True)


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


# what ``sync=co2`` leaves at null takes its overlap's default: the stale form keeps CO2's
# tuned recipe; the eager form has no staleness penalty and no clip (Kale et al. have neither)
# and local's recipe (outer SGD lr 1, no momentum: then it is the paper's update exactly);
# DiLoCo's recipe diverged under eager on the quality harness (docs/sync.md, "Overlap")
OVERLAP_DEFAULTS = {
    "stale": {"staleness_penalty": 0.5, "clip": 1.0, "outer_optim": CO2_RECIPE},
    "eager": {"staleness_penalty": 0.0, "clip": math.inf, "outer_optim": default_outer_optim()},
}


@dataclass
class CO2Config(LocalConfig):
    # stale: the mean of round t is applied at the end of round t+1 (CO2, Algorithm 1);
    # eager: Kale et al. 2025's eager updates (see ``CO2``)
    overlap: str = "stale"
    # {} = the overlap's recipe (stale: SGD Nesterov 0.5, lr 1; eager: SGD lr 1, no momentum), updated with the keys given
    outer_optim: dict = field(default_factory=dict)
    clip: Optional[float] = None              # null: the overlap's default (stale 1.0, eager inf)
    # Lambda = 1 + s * ||anchor move|| / ||pseudo-gradient||, per layer (0 = off; null: 0.5 stale, 0 eager)
    staleness_penalty: Optional[float] = None

    def resolved(self) -> "CO2Config":
        """A copy with every null option set to its overlap's default."""
        one_of(self.overlap, tuple(OVERLAP_DEFAULTS), "overlap")
        base = OVERLAP_DEFAULTS[self.overlap]
        filled = {k: copy.deepcopy(v) for k, v in base.items() if getattr(self, k) is None}
        filled["outer_optim"] = {**base["outer_optim"], **self.outer_optim}
        return dataclasses.replace(self, **filled)

    def check(self) -> None:
        cfg = self.resolved()
        LocalConfig.check(cfg)
        need(cfg.staleness_penalty >= 0, "staleness_penalty", cfg.staleness_penalty, "must be >= 0 (0 = off)")
        need(cfg.overlap == "stale" or cfg.staleness_penalty == 0, "staleness_penalty", cfg.staleness_penalty,
             "sync.overlap=eager applies every mean as soon as it arrives: there is no staleness gap to penalise")
        need(cfg.fragments == 1 and cfg.fragment_delay == 0, "fragments", cfg.fragments,
             "streaming fragments are sync=local's (each fragment's all-reduce overlaps fragment_delay steps)")


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

    @torch.no_grad()
    def trial(self, d: list[torch.Tensor]) -> list[torch.Tensor]:
        """Where ``step`` with ``d`` would move the anchor, as fresh tensors; the anchor, the
        optimizer's state and the clip counter are left as they were (eager updates' per-rank
        step from the consensus)."""
        before = [a.clone() for a in self.params]
        saved = {p: {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in st.items()}
                 for p, st in self.optimizer.state.items()}
        clipped = self.clipped
        self.step(self.params, d)
        moved = [a.clone() for a in self.params]
        for a, b in zip(self.params, before):
            a.copy_(b)
        self.optimizer.state.clear()
        self.optimizer.state.update(saved)
        self.clipped = clipped
        return moved

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
        opt = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(LocalConfig)
               if f.name.startswith(("fragment", "moment"))}  # configs built by hand may leave them out
        self.moments = MomentAverager(opt["moment1_every"], opt["moment2_every"], meter)
        # streaming fragments (``thinwire.comm.streaming``): at most one fragment's mean in flight
        self.streaming = opt["fragments"] > 1 or opt["fragment_delay"] > 0
        if self.streaming:
            self.fragments = strided_fragments(self.space.names, opt["fragments"])
            self.schedule = FragmentSchedule(self.H, opt["fragments"], opt["fragment_delay"])
            self.alpha = opt["fragment_alpha"]
        self.pending: int | None = None                    # the fragment in flight
        self.pending_future: torch.futures.Future | None = None
        self.pending_mean: torch.Tensor | None = None      # its mean, once waited for

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

    # -- streaming fragments ---------------------------------------------------------
    def _fragment(self, flat: torch.Tensor, j: int) -> torch.Tensor:
        pieces = self.space.split(flat)
        return torch.cat([pieces[i].reshape(-1) for i in self.fragments[j]])

    def _complete_fragment(self) -> float:
        if self.pending_future is None:
            return 0.0
        t0 = time.perf_counter()
        self.pending_mean = self.pending_future.wait()
        self.averager.commit()
        self.pending_future = None
        return time.perf_counter() - t0

    def _merge_fragment(self, j: int) -> None:
        """Outer step on fragment j's anchor with its mean; w = alpha w + (1 - alpha) anchor."""
        idx = self.fragments[j]
        mean = [x.clone() for x in self.pending_mean.split([self.space.sizes[i] for i in idx])]
        anchor = [self.anchor[i] for i in idx]
        self.outer.step(anchor, [x.view_as(a) for x, a in zip(mean, anchor)])
        live = self.space.read_flat()
        pieces = self.space.split(live)
        for i in idx:
            if self.alpha == 0:
                pieces[i].copy_(self.anchor[i].reshape(pieces[i].shape))
            else:
                pieces[i].mul_(self.alpha).add_(self.anchor[i].reshape(pieces[i].shape), alpha=1 - self.alpha)
        self.space.write_flat(live)
        self.pending, self.pending_mean = None, None

    def stream_step(self, step: int) -> dict[str, float]:
        s = step + 1
        wait, out = 0.0, {}
        j = self.schedule.consumed_at(s)
        if j is not None and self.pending == j:
            wait += self._complete_fragment()
            self._merge_fragment(j)
        j = self.schedule.launched_at(s)
        if j is not None:
            t0 = time.perf_counter()
            idx = self.fragments[j]
            delta = self._fragment(self.space.flat(self.anchor), j) - self._fragment(self.space.read_flat(), j)
            if self.finite_everywhere(delta):
                self.pending = j
                self.pending_future = self.averager.average_async(
                    [self.space.names[i] for i in idx], [self.space.sizes[i] for i in idx], delta, self.round)
                if self.schedule.consumed_at(s) == j:  # tau = 0: consumed where launched
                    self._complete_fragment()
                    self._merge_fragment(j)
            else:  # a non-finite fragment somewhere: every rank restarts it from its anchor
                live = self.space.read_flat()
                pieces = self.space.split(live)
                for i in idx:
                    pieces[i].copy_(self.anchor[i].reshape(pieces[i].shape))
                self.space.write_flat(live)
                self.skipped += 1
            wait += time.perf_counter() - t0
            out["fragment"] = j
        if s % self.H:
            return {**out, "comm_wait_s": wait, **self.averager.take_stats()} if out else {}
        self.round += 1
        self.moments.after_round(self.round)
        return self.metrics(wait, **out, **self.averager.take_stats())

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


@SYNC_STRATEGIES.register("co2")
class CO2(LocalUpdates):
    """``sync=co2``: the outer average of round t overlaps round t+1 (see module doc).

    ``sync.overlap=stale`` (default) is CO2's Algorithm 1 (module doc). ``sync.overlap=eager``
    is the eager update of Kale, Douillard, Donchev 2025 ("Eager updates for overlapped
    communication and computation in DiLoCo", arXiv 2502.12996). Index convention, the
    paper's: outer step t follows the inner steps of round t, which produce Delta_m^(t);
    the all-reduce of Delta^(t) = mean_m Delta_m^(t) is launched at the end of round t and
    arrives during round t+1. The paper's eager outer gradient at step t is

        Dtilde_m^(t) = Delta_m^(t) / M + sum_{m' != m} Delta_{m'}^(t-1) / M

    (own fresh share, the others' one round old), applied by worker m's outer optimizer to
    its own parameters. Unrolled, every contribution is applied once (own at its round, the
    others' one round later), so worker m's anchor is the consensus of the means up to t-1
    plus its own fresh share. That is how it is computed here, at the end of round t on
    rank i::

        c_{t-1} = OuterOpt(c_{t-2}, Delta^(t-1))      consensus: all-reduced means only, its own state
        Delta_i^(t) = a_i - w_i                       from where this rank's round began
        launch the all-reduce of Delta_i^(t)
        a_i = OuterOpt'(c_{t-1}, Delta_i^(t) / p);  w_i = a_i      OuterOpt': a copy of c's state

    so a_i differs from the consensus by its own fresh term passed through the outer
    optimizer (with SGD lr 1 and no momentum, exactly the paper's unrolled update). With
    momentum the paper keeps one outer optimizer per worker fed with Dtilde; here the
    optimizer state is the consensus's, fed with means only, and identical on every rank
    (the issue's design: the per-rank part is only the fresh term). The model evaluated,
    sampled from and compared across ranks is c after the mean in flight is waited for and
    applied: at the run's end c_T includes round T's mean (the last round finishes
    synchronously; its bytes were counted at launch, like every round's). No staleness
    penalty and no outer clip by default (the paper has neither; ``staleness_penalty > 0``
    is rejected, ``clip`` may be set). The checkpoint holds c, its optimizer state and a_i;
    a mean in flight is first waited for and applied to c, which changes only timing, never
    values (the same holds for an evaluation mid-round). p is the number of replicas
    averaged (the cross group's size under ZeRO replica groups).
    """
    Config = CO2Config

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas=None):
        cfg = co2_options(cfg)
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        self.penalty_strength = cfg.staleness_penalty
        self.eager = cfg.overlap == "eager"
        if self.eager:
            self.start = self.space.read_flat()        # this rank's own anchor a_i: where its round began
            self.replicas_n = accounting.group_size(self.averager.group) if world.world_size > 1 else 1
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
        if self.eager:  # the consensus takes every mean as soon as it is waited for
            self.outer_step(self.mean)
            self.mean = None
        return time.perf_counter() - t0

    def after_step(self, step: int) -> dict[str, float]:
        if (step + 1) % self.H != 0:
            return {}
        if self.eager:
            return self.eager_step()
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
        self.moments.after_round(self.round)
        t0 = time.perf_counter()
        delta = self.pseudo_gradient(live)  # Delta_{t+1}^i, agreed finite before it is launched
        if self.finite_everywhere(delta):
            self._launch(delta)
        else:
            self.skip_round()
        wait += time.perf_counter() - t0
        return self.metrics(wait, **out, **self.averager.take_stats())

    def eager_step(self) -> dict[str, float]:
        """End of round t under ``overlap=eager`` (see the class doc)."""
        consume_s = time.perf_counter()
        out: dict[str, float] = {}
        in_flight = self.future is not None
        wait = self._complete()                            # c_{t-1} = OuterOpt(c_{t-2}, Delta^{t-1})
        if in_flight and self.done_s and self.launched_s:
            hidden = max(0.0, min(self.done_s, consume_s) - self.launched_s)
            out["overlap_fraction"] = min(1.0, hidden / max(self.done_s - self.launched_s, 1e-9))
        t0 = time.perf_counter()
        live = self.space.read_flat()
        delta = self.start - live                          # Delta_i^t
        self.round += 1
        self.moments.after_round(self.round)
        if not self.finite_everywhere(delta):
            self.space.write_flat(self.start)              # restart the round from this rank's own anchor
            self.skipped += 1
            return self.metrics(wait + time.perf_counter() - t0, **out)
        self._launch(delta.clone())
        # the others' one-round-old contributions are in c (Delta^{t-1}); this rank's fresh share steps from it
        self.start = self.space.flat(self.outer.trial(self.space.split(delta.div(self.replicas_n))))
        self.space.write_flat(self.start)
        wait += time.perf_counter() - t0
        return self.metrics(wait, **out, **self.averager.take_stats())

    @contextlib.contextmanager
    def eval_model(self):
        """Eager: the consensus anchor, after the mean in flight is waited for and applied
        (the same on every rank); stale: the mean of the ranks' live parameters."""
        if not self.eager:
            with super().eval_model() as m:
                yield m
            return
        self._complete()
        live = self.space.read_flat()
        self.space.write_flat(self.space.flat(self.anchor))
        try:
            yield self.model
        finally:
            self.space.write_flat(live)

    def close(self) -> None:
        self._complete()

    def state_dict(self) -> dict:
        self._complete()  # a checkpoint holds the finished mean, never a live handle
        state = super().state_dict()
        state.update({"snapshot": self.snapshot, "mean": self.mean,
                      "last_step": None if self.last_step is None else [s.clone() for s in self.last_step]})
        if self.eager:
            state["eager"] = {"start": self.start.clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.snapshot, self.mean, self.last_step = state["snapshot"], state["mean"], state["last_step"]
        self.future, self.launched_s, self.done_s = None, 0.0, 0.0
        if self.eager:
            self.start = state["eager"]["start"]


def co2_options(cfg):
    """``sync=co2``'s options with nulls set to the overlap's defaults (``CO2Config.resolved``)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    own = {f.name for f in dataclasses.fields(CO2Config)}
    resolved = dataclasses.asdict(CO2Config(**{k: v for k, v in values.items() if k in own}).resolved())
    return OmegaConf.create({**values, **resolved})
