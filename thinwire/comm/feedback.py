"""Error feedback: what each rank sends, and what the optimizer sees, given a compressor C.

Per-rank buffers are keyed by parameter name (never by DDP bucket index) and live in a
``Feedback`` object. Every rule here is a pure function of (buffers, gradient, what
this rank sent, the aggregated mean) that *returns* the new buffers; the hook stages
them and they are committed only when the step is accepted, so a skipped step leaves
them bit-for-bit untouched.

Notation (as in EF21, Richtarik et al. 2021, and EControl, Gao et al. 2023): g = this
rank's gradient for one parameter, C(x) the
compressed-then-decompressed x as this rank sent it ("local"), mean = mean over ranks
of what was sent (exact for allreduce/allgather).

- ``none``: send C(g); the optimizer sees mean_i C(g_i).
- ``ef`` (Seide et al. 2014; EF-SGD, Karimireddy et al. 2019, Alg. 2 in gradient form):
  q = g + e;  send C(q);  e <- q - C(q);  optimizer sees mean_i C(q_i).
  Karimireddy compresses lr * g + e; we keep e in gradient units instead, so when the
  learning rate changes from lr_{t-1} to lr_t the residual is rescaled by
  lr_{t-1} / lr_t (``lr_ratio``), which makes the two forms identical for SGD.
  ``ef_decay`` = beta (default 1: the rule above, bit for bit) decays the residual first,
  q = beta e + g, as SparseLoCo does with the pseudo-gradient (arXiv 2508.15706, Algorithm 1:
  e <- beta e + Delta; send C(e); e <- e - C(e); beta = 0.95), where the decayed buffer is
  the outer momentum (the outer step is plain SGD). Both factors apply to e in the same
  step (q = g + beta * lr_ratio * e); the outer loop of sync=local|co2 passes lr_ratio = 1.
- ``ef21`` (Richtarik, Sokolov, Fatkhullin 2021, Alg. 1; "EF Reloaded" 2024):
  c_i = C(g - g_i);  g_i <- g_i + c_i;  G <- G + mean_i c_i;  optimizer sees G.
  Initialisation (``init``): ``dense`` (the paper's practical choice and ours by
  default: g_i = g and G = mean g from one uncompressed round, the warm-up rounds) or
  ``zero`` (g_i = G = 0, the variant analysed with g_i^0 = 0).
- ``ef21m``: EF21-SGDM, momentum inside the estimator (see ``EF21Momentum``).
- ``econtrol`` (Gao, Islamov, Stich 2023, Alg. 1, "EControl"):
  d_i = C(eta * e_i + g - h_i);  e_i <- e_i + g - h_i - d_i;  h_i <- h_i + d_i;
  H <- H + mean_i d_i;  optimizer sees H.  eta = 0 gives EF21 (e never feeds back); the
  theory wants eta of the order of C's contraction (about k/d for Top-K).  h_i and H
  start from one dense round, like EF21 with ``init=dense``.

- ``dgc`` (Lin, Han, Mao, Wang, Dally 2018, "Deep Gradient Compression", arXiv 1712.01887,
  Sec. 3.2 "momentum correction" and "momentum factor masking", Alg. 1 with Eq. 4):
  u <- m u + g;  v <- v + u;  send C(v);  clear the sent coordinates in both u and v.
  The momentum lives here (``comm.momentum``), so the optimizer steps without its own
  (SGD with ``optim.momentum=0``; validation insists). ``factor_masking=false`` keeps u at
  the sent coordinates (Eq. 4 alone: with C the identity that is exactly SGD with momentum
  m); the paper's masking (the default) clears it, so a coordinate's momentum restarts each
  time it is sent (with C the identity: plain SGD). Options: ``local_clip`` (DGC's local gradient clipping, before g
  enters u; per tensor here, since a comm hook sees one bucket at a time, not the global
  norm the paper clips: set it to the global threshold x N^(-1/2), as the paper scales it)
  and ``sparsity_warmup`` (the paper's warm-up: the density falls from 25% by x1/4 per stage
  to ``comm.ratio`` over that many steps, in equal stages; read by the aggregator). v, like
  ``ef``'s residual, is in gradient units and rescaled by lr_{t-1} / lr_t; u is not (torch
  SGD's momentum buffer is not either). Sent coordinates are those whose decompressed value
  is non-zero (a sent exact 0 leaves that coordinate's u in place: v is 0 there anyway); a
  tensor below ``comm.min_numel`` is sent whole, so with masking its u is cleared every step
  (plain SGD for it: the paper's rule applied literally).

EF21 and EControl need every rank to receive exactly mean_i C(x_i) (G must equal
mean_i g_i on every rank), so they are rejected with the two-phase collective, whose
re-quantisation breaks that equality.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import need, one_of
from ..options import defaults, option_keys
from ..registry import Registry

FEEDBACKS: Registry[type] = Registry("comm.feedback", "thinwire.feedback")


@dataclass
class NoOptions:
    pass


@dataclass
class EFOptions:
    ef_decay: float = 1.0            # beta: e <- beta e + g before compressing (1 = classic EF)

    def check(self):
        need(0 <= self.ef_decay <= 1, "ef_decay", self.ef_decay, "must be in [0, 1]")


@dataclass
class EF21Options:
    init: str = "dense"              # EF21 initialisation: dense (first round uncompressed) | zero

    def check(self):
        one_of(self.init, ("dense", "zero"), "init")


@dataclass
class EF21MOptions(EF21Options):
    eta: float = 0.1                 # momentum parameter of the estimator (the paper's eta)

    def check(self):
        super().check()
        need(0 < self.eta <= 1, "eta", self.eta, "must be in (0, 1]")


@dataclass
class EControlOptions:
    eta: float = 0.1                 # strength of the fed-back error (0 = EF21)

    def check(self):
        need(0 <= self.eta <= 1, "eta", self.eta, "must be in [0, 1]")


@dataclass
class DGCOptions:
    momentum: float = 0.9            # m of the velocity u <- m u + g (the optimizer's momentum moves here)
    local_clip: float = 0.0          # per-tensor norm bound of this rank's gradient before it enters u; 0 = off
    sparsity_warmup: int = 0         # steps over which the density falls from 25% to comm.ratio (x1/4 per stage)
    factor_masking: bool = True      # clear u, not only v, at the sent coordinates (DGC's momentum factor masking)

    def check(self):
        need(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        need(self.local_clip >= 0, "local_clip", self.local_clip, "must be >= 0 (0 = off)")
        need(self.sparsity_warmup >= 0, "sparsity_warmup", self.sparsity_warmup, "must be >= 0 (0 = off)")


class Feedback:
    """``none``: no memory; the optimizer sees the mean of the compressed gradients."""

    Config = NoOptions
    needs_exact_aggregation = False
    dense_init = False          # whether warm-up (uncompressed) rounds initialise buffers
    keeps_momentum = False      # the rule applies SGD's momentum itself (dgc): the optimizer must not

    def density(self, iteration: int, ratio: float) -> float:
        """The compressor's density (``comm.ratio``) at ``iteration``: ``ratio`` unless the rule
        schedules its own (DGC's sparsity warm-up)."""
        return ratio

    def __init__(self, options=None):
        for key, value in vars(options if options is not None else self.Config()).items():
            setattr(self, key, value)
        self.store: dict[str, dict[str, torch.Tensor]] = {}

    def buf(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        b = self.store.get(name, {}).get(key)
        return torch.zeros_like(like) if b is None else b

    def message(self, name: str, g: torch.Tensor, lr_ratio: float = 1.0) -> torch.Tensor:
        """The vector this rank compresses and sends for parameter ``name``."""
        return g

    def result(self, name: str, g, q, local, mean) -> tuple[torch.Tensor, dict]:
        """(what the optimizer sees, new buffers to stage) after aggregation."""
        return mean, {}

    def dense(self, name: str, g, mean) -> dict:
        """Buffers after an uncompressed round (warm-up)."""
        return {}

    def residual_sq(self, staged: dict) -> float:
        """Squared norm of the error this rank still owes (for the metrics)."""
        e = staged.get("e")
        return float(e.double().pow(2).sum()) if e is not None else 0.0

    def state_dict(self) -> dict:
        return {n: {k: v.clone() for k, v in bufs.items()} for n, bufs in self.store.items()}

    def load_state_dict(self, state: dict) -> None:
        self.store = {n: {k: v.clone() for k, v in bufs.items()} for n, bufs in state.items()}

    def commit(self, staged: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, bufs in staged.items():
            self.store.setdefault(name, {}).update(bufs)


FEEDBACKS.register("none")(Feedback)


@FEEDBACKS.register("ef")
class ClassicEF(Feedback):
    Config = EFOptions

    def message(self, name, g, lr_ratio=1.0):
        e = self.store.get(name, {}).get("e")
        if e is None:
            return g.clone()
        if self.ef_decay != 1.0:  # decayed EF: the factors compose, beta and the lr rescaling
            return g + e * (self.ef_decay * lr_ratio)
        return g + e * lr_ratio if lr_ratio != 1.0 else g + e

    def result(self, name, g, q, local, mean):
        return mean, {"e": q - local}


@FEEDBACKS.register("ef21")
class EF21(Feedback):
    Config = EF21Options
    needs_exact_aggregation = True

    @property
    def dense_init(self) -> bool:
        return self.init == "dense"

    def message(self, name, g, lr_ratio=1.0):
        return g - self.buf(name, "g_i", g)

    def result(self, name, g, q, local, mean):
        g_i = self.buf(name, "g_i", g) + local
        G = self.buf(name, "G", g) + mean
        return G, {"g_i": g_i, "G": G}

    def dense(self, name, g, mean):
        return {"g_i": g.clone(), "G": mean.clone()}

    def residual_sq(self, staged):
        return 0.0


@FEEDBACKS.register("ef21m")
class EF21Momentum(EF21):
    """EF21-SGDM (Fatkhullin, Tyurin, Richtarik 2023, "Momentum provably improves error
    feedback!", Alg. 2): the compressed estimator tracks a momentum of the stochastic
    gradient instead of the gradient itself, which removes EF21's need for large batches:
        v_i <- (1 - eta) v_i + eta g;  c_i = C(v_i - g_i);  g_i <- g_i + c_i;  G <- G + mean c_i.
    ``eta`` is ``comm.eta`` (the paper's momentum parameter; 0.1 is a good start). The
    optimizer sees G; use it with plain SGD (momentum 0), the momentum lives here."""

    Config = EF21MOptions

    def momentum(self, name, g):
        """v_i after this step's gradient g (the committed v_i is not changed)."""
        return (1 - self.eta) * self.buf(name, "v", g) + self.eta * g

    def message(self, name, g, lr_ratio=1.0):
        return self.momentum(name, g) - self.buf(name, "g_i", g)

    def result(self, name, g, q, local, mean):
        G, bufs = super().result(name, g, q, local, mean)
        return G, {**bufs, "v": self.momentum(name, g)}  # the same v as message's: same buffers, same g

    def dense(self, name, g, mean):
        return {**super().dense(name, g, mean), "v": g.clone()}


@FEEDBACKS.register("econtrol")
class EControl(Feedback):
    Config = EControlOptions
    needs_exact_aggregation = True
    dense_init = True

    def message(self, name, g, lr_ratio=1.0):
        return self.eta * self.buf(name, "e", g) + g - self.buf(name, "h_i", g)

    def result(self, name, g, q, local, mean):
        h_i = self.buf(name, "h_i", g)
        e = self.buf(name, "e", g) + g - h_i - local
        H = self.buf(name, "H", g) + mean
        return H, {"e": e, "h_i": h_i + local, "H": H}

    def dense(self, name, g, mean):
        return {"e": torch.zeros_like(g), "h_i": g.clone(), "H": mean.clone()}


@FEEDBACKS.register("dgc")
class DGC(Feedback):
    """DGC's momentum correction with momentum factor masking (module docstring)."""

    Config = DGCOptions
    keeps_momentum = True

    def velocity(self, name, g):
        """u after this step's gradient g (locally clipped); the committed u is not changed."""
        if self.local_clip > 0:
            norm = float(torch.linalg.vector_norm(g))
            if norm > self.local_clip:
                g = g * (self.local_clip / (norm + 1e-6))
        return self.buf(name, "u", g) * self.momentum + g

    def message(self, name, g, lr_ratio=1.0):
        v = self.buf(name, "v", g)
        return (v * lr_ratio if lr_ratio != 1.0 else v) + self.velocity(name, g)

    def result(self, name, g, q, local, mean):
        sent = local != 0
        u = self.velocity(name, g)
        return mean, {"u": u.masked_fill_(sent, 0.0) if self.factor_masking else u, "v": q.masked_fill(sent, 0.0)}

    def residual_sq(self, staged):
        v = staged.get("v")
        return float(v.double().pow(2).sum()) if v is not None else 0.0

    def density(self, iteration, ratio):
        """DGC Sec. 3.4: 25%, 6.25%, 1.5625%, ... (x1/4 per stage) while above ``ratio``, the stages
        of equal length filling ``sparsity_warmup`` steps; then ``ratio``."""
        stages = []
        d = 0.25
        while d > ratio:
            stages.append(d)
            d /= 4
        if iteration >= self.sparsity_warmup or not stages:
            return ratio
        return stages[iteration * len(stages) // self.sparsity_warmup]


def feedback_options() -> type:
    """The options of every feedback rule, as one dataclass: these keys are group-wide in
    ``comm`` (any compressor can be combined with any rule); a rule's defaults are written
    once, in its options. Each rule owns its keys: where two rules share a key with
    different defaults (a third-party rule reusing ``eta``), the group-wide default is null,
    meaning "the chosen rule's own default" (:func:`rule_values`)."""
    merged: dict[str, tuple] = {}
    seen: dict[str, object] = {}
    for name, cls in FEEDBACKS.items():
        for f in dataclasses.fields(cls.Config):
            d = defaults(cls.Config)[f.name]
            if f.name in seen and seen[f.name] != d:
                merged[f.name] = (f.name, Any, dataclasses.field(default=None))
                continue
            seen.setdefault(f.name, d)
            merged.setdefault(f.name, (f.name, f.type, dataclasses.field(default=d)))
    return dataclasses.make_dataclass("FeedbackOptions", list(merged.values()))


def rule_values(cls, values) -> dict:
    """Rule ``cls``'s own keys from a comm config's ``values``: a null where rules disagree
    on a key's default (:func:`feedback_options`) is this rule's own default."""
    own, shared = defaults(cls.Config), defaults(feedback_options())
    out = {}
    for k, d in own.items():
        v = values[k] if k in values else d
        out[k] = d if v is None and shared.get(k, d) is None else v
    return out


def check_feedback_options(name: str, values) -> None:
    """Feedback keys of other rules must keep their defaults (they would do nothing); the
    rule's own keys are checked by its options."""
    cls = FEEDBACKS.get(name, "comm.feedback")
    own = option_keys(cls.Config)
    for key, default in defaults(feedback_options()).items():
        if key not in own and values[key] != default:
            has = [n for n, c in FEEDBACKS.items() if key in option_keys(c.Config)]
            raise ValueError(f"{key}={values[key]}: not an option of comm.feedback={name} "
                             f"({', '.join(has)} {'has' if len(has) == 1 else 'have'} it)")
    check = getattr(cls.Config, "check", None)
    if check is not None:
        check(cls.Config(**rule_values(cls, values)))


def build_feedback(name: str, **options) -> Feedback:
    """Feedback rule ``name``; ``options`` may hold any feedback key, each rule takes its own."""
    cls = FEEDBACKS.get(name, "comm.feedback")
    return cls(cls.Config(**rule_values(cls, options)))
