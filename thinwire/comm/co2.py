"""CO2 (``sync=co2``; Sun et al. 2024, "CO2: Efficient distributed training with full
communication-computation overlap", Algorithm 1): local updates (``.local``) whose outer
all-reduce of round t runs while round t+1 computes and is consumed at the end of round t+1,
one round stale::

    end of round t+1:  d_t = mean_i Delta_t^i            (wait for the in-flight average)
                       d_t <- d_t / Lambda_t             (staleness-gap penalty)
                       a_{t+1} = OuterOpt(a_t, clip(d_t))
                       w_i += a_{t+1} - y_t^i            (keep round t+1's own progress)
                       Delta_{t+1}^i = a_{t+1} - w_i     (snapshot, then launch its average)

with y_t^i = a_t - Delta_t^i the rank's parameters at the end of round t. ``sync.overlap=eager``
applies the average as soon as it arrives and steps each rank with an estimate built from its
own fresh pseudo-gradient (Kale et al. 2025; ``.eager``).

Overlap: on gloo the average is an async work on ``world.async_group`` (a process group
of its own, so its order never interleaves with the per-step control all-reduce); its
``Future`` callbacks decompress on gloo's thread while the main thread computes. On NCCL
the snapshot is taken and the collective launched from a side CUDA stream that first
waits for the compute stream; before consuming, the compute stream waits for the side
stream, and the snapshot buffer is recorded on it so the allocator cannot reuse it early.

Non-finite pseudo-gradients (``.local``): the check runs before the snapshot is launched; the
round that was in flight is consumed as usual, since it passed its own check.

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
from typing import Optional

import torch

from ..errors import need, one_of
from .eager import EagerUpdates
from .futures import then
from .local import LocalConfig, LocalUpdates
from .outer_optimizer import default_outer_optim
from .sync import SYNC_STRATEGIES

# CO2's outer recipe (Sun et al. 2024: Nesterov 0.5, lr 1); DiLoCo's (Nesterov 0.9, lr 0.7) is
# configs/sync/diloco.yaml
CO2_RECIPE = default_outer_optim(momentum=0.5, nesterov=True)

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
    # eager: Kale et al. 2025's eager updates (see ``thinwire.comm.eager``)
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


def co2_options(cfg):
    """``sync=co2``'s options with nulls set to the overlap's defaults (``CO2Config.resolved``)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    own = {f.name for f in dataclasses.fields(CO2Config)}
    resolved = dataclasses.asdict(CO2Config(**{k: v for k, v in values.items() if k in own}).resolved())
    return OmegaConf.create({**values, **resolved})


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


@SYNC_STRATEGIES.register("co2")
class CO2(EagerUpdates, LocalUpdates):
    """``sync=co2``: the outer average of round t overlaps round t+1 (see module doc).

    ``sync.overlap=stale`` (default) is CO2's Algorithm 1 (module doc). ``sync.overlap=eager``
    is the eager update of Kale, Douillard, Donchev 2025, whose own steps are
    :class:`~thinwire.comm.eager.EagerUpdates` (that module's doc); both forms launch and
    wait for the average here.
    """
    Config = CO2Config

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas=None):
        cfg = co2_options(cfg)
        super().__init__(cfg, world, meter, model, comm_cfg, replicas)
        # NCCL: the round's all-reduce runs on a side stream, overlapping the next round's compute
        self.cuda_stream = torch.cuda.Stream(device=world.device) if world.device.type == "cuda" else None
        self.penalty_strength = cfg.staleness_penalty
        self.eager = cfg.overlap == "eager"
        if self.eager:
            self.init_eager(world)
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
        self.future = then(fut, self._mark_done)

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

    @contextlib.contextmanager
    def eval_model(self):
        """Eager: the consensus anchor (``EagerUpdates.consensus_model``); stale: the mean of
        the ranks' live parameters."""
        with (self.consensus_model() if self.eager else super().eval_model()) as m:
            yield m

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

