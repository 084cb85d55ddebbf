"""A round of the outer loop as plain data (:class:`Round`), built from ``sync.*``
(:func:`round_of`); ``thinwire.comm.local.OuterStrategy`` runs it. Fragments are data, as in
torchft's ``DiLoCo`` (``torchft/local_sgd.py``: a list of modules, a sync delay, a merge weight)::

    fragments   F strided blocks of pieces (Streaming DiLoCo, arXiv 2501.18512, Sec. 2.2); F = 1: all
    merge_at    o_j = (j + 1) H / F mod H: the step of the round where fragment j merges
    delay       steps from launch to merge: tau (sync=local; 0 = synchronous), H (sync=co2: one round)
    merge       sync (local) | stale (co2, Sun et al. 2024) | eager (Kale et al. 2025)

``sync=local`` with F = 1, tau = 0 is Local SGD / DiLoCo; F > 1 or tau > 0 is Streaming DiLoCo;
``sync=co2`` with F > 1 launches each fragment at its offset and merges it one round later.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, need, one_of
from .outer_optimizer import build_outer_optimizer, default_outer_optim, outer_spec


@dataclass
class LocalConfig:
    """Options of ``sync=local`` (and, with the overlap's keys, ``sync=co2``)."""
    local_steps: int = 4             # H: inner steps per round
    # the outer optimizer on the anchor: any torch optimizer (``_target_`` + its keyword
    # arguments), as torchft's DiLoCo takes one. lr 1, no momentum = parameter averaging;
    # DiLoCo: momentum 0.9, nesterov, lr null = tuned for H and the replica count (``sync=diloco``;
    # ``outer_optimizer.DILOCO_OUTER_LR``)
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
    # where the anchor and the outer optimizer's state live between outer steps: null = the model's
    # device; cpu = host memory (pinned when the model is on CUDA), as torchft's DiLoCo keeps its copy
    # of the parameters; the outer step still computes on the model's device (bitwise the same results)
    anchor_device: Optional[str] = None
    allows_inf = ("clip",)           # clip=.inf: no clipping (every other float option must be finite)

    def check(self) -> None:
        need(self.local_steps >= 1, "local_steps", self.local_steps, "must be >= 1")
        need(self.clip > 0, "clip", self.clip, "must be positive (pseudo-gradient clipping threshold)")
        one_of(self.clip_mode, ("norm", "value"), "clip_mode")
        build_outer_optimizer([torch.zeros(1)], outer_spec(self.outer_optim, self.local_steps, 1)[0])
        need(self.fragments >= 1, "fragments", self.fragments, "must be >= 1")
        need(self.local_steps % self.fragments == 0, "fragments", self.fragments,
             f"must divide local_steps={self.local_steps} (fragments synchronise at staggered steps of a round)")
        need(0 <= self.fragment_delay < self.local_steps // self.fragments, "fragment_delay", self.fragment_delay,
             f"must be in [0, local_steps/fragments={self.local_steps // self.fragments}): a fragment's "
             f"all-reduce must finish before that fragment is reduced again")
        need(0.0 <= self.fragment_alpha <= 1.0, "fragment_alpha", self.fragment_alpha, "must be in [0, 1]")
        need(self.moment1_every >= 0, "moment1_every", self.moment1_every, "must be >= 0 (0 = never)")
        need(self.moment2_every >= 0, "moment2_every", self.moment2_every, "must be >= 0 (0 = never)")
        need(self.anchor_device in (None, "cpu"), "anchor_device", self.anchor_device,
             "expected cpu or null (null: the model's device)")


# CO2's outer recipe (Sun et al. 2024: Nesterov 0.5, lr 1); DiLoCo's (Nesterov 0.9, lr tuned per H and
# replica count) is configs/sync/diloco.yaml
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
    # eager: Kale et al. 2025's eager updates (see ``thinwire.comm.local``)
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
        need(cfg.fragment_delay == 0, "fragment_delay", cfg.fragment_delay,
             "sync=co2 merges each fragment one whole round after its launch; the delay tau is sync=local's")
        need(cfg.fragment_alpha == 0, "fragment_alpha", cfg.fragment_alpha,
             "sync=co2 keeps each rank's progress since the launch whole (w += a_{t+1} - y_t); "
             "the merge weight is sync=local's")


def co2_options(cfg):
    """``sync=co2``'s options with nulls set to the overlap's defaults (``CO2Config.resolved``)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    own = {f.name for f in dataclasses.fields(CO2Config)}
    resolved = dataclasses.asdict(CO2Config(**{k: v for k, v in values.items() if k in own}).resolved())
    return OmegaConf.create({**values, **resolved})


def block_of(name: str) -> str | None:
    """A parameter's block: its name up to the first all-digit part (``blocks.3.attn.w`` -> ``blocks.3``)."""
    parts = name.split(".")
    return next((".".join(parts[:k + 1]) for k, part in enumerate(parts) if part.isdigit()), None)


def strided_fragments(names: list[str], n: int) -> list[list[int]]:
    """Piece indices of each of the ``n`` fragments: block b (in order of first appearance)
    goes to fragment b % n, the k-th piece outside any block to fragment k % n (a departure
    from the paper, which fragments only transformer blocks: the rest has to synchronise
    somewhere, and spreading it keeps the fragments' sizes close). Raises a ConfigError when
    there are fewer blocks than fragments."""
    blocks: dict[str, int] = {}
    loose = 0
    out: list[list[int]] = [[] for _ in range(n)]
    for i, name in enumerate(names):
        b = block_of(name)
        if b is None:
            out[loose % n].append(i)
            loose += 1
        else:
            out[blocks.setdefault(b, len(blocks)) % n].append(i)
    if n > 1 and len(blocks) < n:
        raise ConfigError(f"sync.fragments={n}: the model has {len(blocks)} blocks; at most one fragment per block")
    return out


@dataclass(frozen=True)
class Round:
    """One round of H inner steps (module doc). Steps ``s`` are 1-based global steps."""
    steps: int                          # H
    fragments: list                     # piece indices of each fragment
    delay: int                          # launch -> merge, in steps
    merge: str                          # sync | stale | eager
    alpha: float = 0.0                  # sync: w = alpha w + (1 - alpha) a
    penalty: float = 0.0                # stale: the staleness-gap penalty's strength
    moments: tuple = (0, 0)             # (K_u, K_v): inner moments averaged every K rounds

    def merge_at(self, j: int) -> int:
        return ((j + 1) * self.steps // len(self.fragments)) % self.steps

    def merges(self, s: int) -> list[int]:
        return [j for j in range(len(self.fragments)) if self.merge_at(j) == s % self.steps]

    def launches(self, s: int) -> list[int]:
        return [j for j in range(len(self.fragments)) if (self.merge_at(j) - self.delay) % self.steps == s % self.steps]

    @property
    def streaming(self) -> bool:
        """Fragments, or a delay inside the round: metrics name the fragment launched."""
        return len(self.fragments) > 1 or 0 < self.delay < self.steps


def round_of(cfg, names: list[str]) -> Round:
    """The round ``sync.*`` describes over the pieces ``names`` (``cfg`` resolved: ``co2_options``);
    a config built by hand may leave out the fragment and moment keys."""
    opt = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(LocalConfig)}
    merge = cfg.get("overlap", "sync")
    return Round(cfg.local_steps, strided_fragments(names, opt["fragments"]),
                 opt["fragment_delay"] if merge == "sync" else cfg.local_steps, merge, opt["fragment_alpha"],
                 cfg.get("staleness_penalty", 0.0) or 0.0, (opt["moment1_every"], opt["moment2_every"]))
