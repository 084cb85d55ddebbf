"""One replica slot: its model, inner optimizer, anchor and outer optimizer.

The outer step is thinwire's own (``thinwire.comm.outer_optimizer.OuterOptimizer`` on the
anchor, read and written through ``thinwire.comm.param_space.ModuleParams``), with the options
of ``sync=local`` (``LocalConfig``: ``outer_optim``, ``clip``, ``clip_mode``); ``sync=diloco``
is the same with DiLoCo's outer SGD (Nesterov 0.9, the outer lr ``sync=diloco`` resolves for H and
the nominal slot count: ``thinwire.comm.outer_optimizer.tuned_outer_lr``).

Slots, not ranks: the batch of slot ``s`` at global step ``t`` is a function of
``(seed, s, nominal, t)`` only, so a replacement for slot ``s`` trains exactly slot ``s``'s
batches, whatever the live set.

State rules for a joiner (a restarted or late replica that heals): consensus state (anchor,
outer-optimizer state, round counter) from the source; parameters = anchor; inner optimizer
fresh (its state reset: a fixed rule the reference replays from the tape); under a compressed
exchange (``exchange``) its error-feedback residual 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..comm.local import LocalConfig
from ..comm.outer_optimizer import OuterOptimizer, default_outer_optim, tuned_outer_lr
from ..comm.param_space import ModuleParams
from .state import digest, pack, unpack

OUTER_PRESETS = {
    "local": default_outer_optim(),
    "diloco": default_outer_optim(momentum=0.9, nesterov=True, lr=None),  # lr: tuned_outer_lr(H, N)
}


@dataclass
class ReplicaSpec:
    """Everything a slot's process needs to build its replica (plain values: it crosses
    process boundaries as JSON). The default model is a tiny MLP on a synthetic task."""
    sync: str = "diloco"           # local | diloco (the outer optimizer preset)
    local_steps: int = 4           # H
    nominal: int = 3               # N: slots (data is keyed by slot and N)
    seed: int = 0
    dims: list = field(default_factory=lambda: [8, 16, 4])
    batch: int = 16
    inner_lr: float = 0.05
    inner_momentum: float = 0.9    # inner SGD momentum (stateful: the joiner rule matters)
    clip: float = 1.0

    def sync_config(self) -> LocalConfig:
        outer = dict(OUTER_PRESETS[self.sync])
        if outer["lr"] is None:  # as sync=diloco resolves it in the trainer, with N the nominal slots
            outer["lr"] = tuned_outer_lr(self.local_steps, self.nominal)
        return LocalConfig(local_steps=self.local_steps, outer_optim=outer, clip=self.clip)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_model(spec: ReplicaSpec) -> torch.nn.Module:
    """The tiny MLP, initialised from its own generator (not the global RNG: simulated
    replicas are threads of one process)."""
    layers = []
    for i, (a, b) in enumerate(zip(spec.dims[:-1], spec.dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(spec.dims) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / p.shape[-1] ** 0.5)
    return model


def batch(spec: ReplicaSpec, slot: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ``slot``'s batch at global step ``step``: keyed by (seed, slot, nominal, step)."""
    g = torch.Generator().manual_seed(((spec.seed * 1_000_003 + spec.nominal) * 10_007 + slot) * 1_000_033 + step)
    x = torch.randn(spec.batch, spec.dims[0], generator=g)
    w = torch.linspace(-1, 1, spec.dims[0] * spec.dims[-1]).reshape(spec.dims[0], spec.dims[-1])
    y = (x @ w + 0.1 * slot).argmax(1)  # slot-dependent labels: the replicas' data differ
    return x, y


class Replica:
    """Slot ``slot``'s training state. ``round`` is the number of outer rounds committed into
    its anchor (``-1``: not yet healed, a fresh joiner).

    Your own model (the library entry point, docs/elastic.md): ``model`` (every slot builds it
    with the same initial parameters), ``inner`` (parameters -> a fresh inner optimizer: the
    joiner rule resets it), ``batch`` ((slot, step) -> (x, y): keyed by slot, never by rank)
    and ``loss`` ((output, y) -> scalar); the defaults are the tiny MLP task of ``spec``.
    ``outer`` ((anchor, norm) -> ``OuterOptimizer``): the outer optimizer, default
    ``spec.sync_config()``'s (``thinwire-train`` passes the one ``sync.*`` configures)."""

    def __init__(self, spec: ReplicaSpec, slot: int, joiner: bool = False, *, model=None, inner=None,
                 batch=None, loss=None, outer=None):
        self.spec, self.slot = spec, slot
        self._inner, self._batch, self._loss = inner, batch, loss or F.cross_entropy
        self.model = model if model is not None else build_model(spec)
        self.space = ModuleParams(self.model)
        self.anchor = self.space.split(self.space.read_flat())
        self.outer = (outer or (lambda anchor, norm: OuterOptimizer(anchor, spec.sync_config(), norm=norm)))(
            self.anchor, self.space.global_norm)
        self.inner = self.fresh_inner()
        self.round = -1 if joiner else 0
        self.exchange = None   # a compressed exchange (thinwire.elastic.exchange.RowCodec): its residual is this slot's
        self.losses: dict[int, float] = {}   # global step -> loss (this slot's)

    def fresh_inner(self) -> torch.optim.Optimizer:
        if self._inner is not None:
            return self._inner(self.model.parameters())
        return torch.optim.SGD(self.model.parameters(), lr=self.spec.inner_lr, momentum=self.spec.inner_momentum)

    # -- local work -------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        x, y = self._batch(self.slot, step) if self._batch is not None else batch(self.spec, self.slot, step)
        self.inner.zero_grad()
        loss = self._loss(self.model(x), y)
        loss.backward()
        self.inner.step()
        self.losses[step] = float(loss.detach())
        return self.losses[step]

    def steps_of(self, rnd: int) -> range:
        H = self.spec.local_steps
        return range(rnd * H, (rnd + 1) * H)

    def pseudo_gradient(self) -> torch.Tensor:
        """Delta = anchor - w, fp32, with -0.0 normalised to +0.0 (a sum with zero rows is
        then exact: the live mean does not depend on the collective's order)."""
        return (self.space.flat(self.anchor) - self.space.read_flat()) + 0.0

    # -- the outer step ---------------------------------------------------------------
    def apply_mean(self, mean: torch.Tensor) -> None:
        """The outer step with the live mean; parameters := the new anchor; round += 1."""
        self.outer.step(self.anchor, [x.clone() for x in self.space.split(mean)])
        self.space.write_flat(self.space.flat(self.anchor))
        self.round += 1

    def restart_round(self) -> None:
        """Discard this round's local work: parameters := anchor."""
        self.space.write_flat(self.space.flat(self.anchor))

    # -- consensus state and healing --------------------------------------------------
    def consensus_state(self) -> dict:
        return {"round": self.round, "anchor": [a.clone() for a in self.anchor], "outer": self.outer.state_dict()}

    def consensus_digest(self) -> str:
        schema, tensors = pack(self.consensus_state())
        return digest(tensors, schema)

    def heal(self, state: dict) -> None:
        """Take a live peer's consensus state; parameters = anchor; inner optimizer fresh; error
        feedback residual 0 (the one it held is logged lost by ``protocol``)."""
        self.round = int(state["round"])
        with torch.no_grad():
            for a, s in zip(self.anchor, state["anchor"]):
                a.copy_(s)
        # the optimizer keeps the tensors it is given: copy them, never alias the source's
        self.outer.load_state_dict(unpack(*pack(state["outer"])))
        self.space.write_flat(self.space.flat(self.anchor))
        self.inner = self.fresh_inner()
        if self.exchange is not None:
            self.exchange.reset()

    def params_digest(self) -> str:
        return digest([p.detach() for p in self.model.parameters()])

    def pack_consensus(self):
        return pack(self.consensus_state())

    @staticmethod
    def unpack_consensus(schema: str, tensors: list[torch.Tensor]) -> dict:
        return unpack(schema, tensors)
