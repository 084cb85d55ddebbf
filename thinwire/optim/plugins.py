"""Optimizer plugins: how a step turns a batch into a parameter update.

A closed registry (``optim=<name>``), extended by third parties through the
``thinwire.optim`` entry-point group. A plugin declares what it needs from the engine:

- ``needs_backprop``: False for forward-only (zeroth-order) methods; the engine then
  builds no DDP wrapper and no gradient buffers are all-reduced;
- ``needs_grad_allreduce``: False for a plugin that exchanges what it needs itself
  (``optim=demo``: compressed momentum); the engine then builds no DDP wrapper, and the
  run must use ``comm=none`` and a sync strategy that would all-reduce gradients;
- ``per_rank_state``: True when the plugin's state differs between ranks (DeMo's momentum):
  checkpoints keep it in every rank's shard instead of once;
- ``trainable(model)``: which parameters it updates.

Its options are its ``Config`` dataclass (``optim.<key>``; the group-wide keys are
``OptimConfig``'s); rules that involve other groups go in a ``check_run(cls, cfg)``
classmethod (``thinwire.options``).

The trainer drives a plugin through three calls per step::

    loss = plugin.compute(forward_model, batch)   # forward (+ backward: DDP hooks fire)
    finite = plugin.local_finite()                # agreed across ranks by the trainer
    plugin.apply(step) | plugin.discard()         # update, or leave everything untouched

``plugin.agreement()`` returns None unless the plugin's own exchange already agreed the
step's loss and finiteness across ranks (zeroth order); the trainer then sends no control
packet of its own.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ConfigError, need, non_negative, one_of, positive
from ..registry import Registry
from .schedule import SCHEDULES, lr_at

OPTIMIZERS: Registry[type] = Registry("optim", "thinwire.optim")


@dataclass
class OptimConfig:
    """The group-wide keys of ``optim``: the learning rate and its schedule, weight decay."""
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"         # constant | cosine | wsd (linear warm-up, then cosine or stable + linear decay)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_start: Optional[int] = None  # wsd: first step of the linear decay (null: 80% of max_steps)

    def check(self) -> None:
        positive(self, "lr")
        non_negative(self, "weight_decay", "warmup_steps")
        one_of(self.schedule, SCHEDULES, "schedule")
        need(self.decay_start is None or self.decay_start >= self.warmup_steps, "decay_start", self.decay_start,
             f"must be null or >= optim.warmup_steps ({self.warmup_steps})")
        need(self.decay_start is None or self.schedule == "wsd", "decay_start", self.decay_start,
             f"is a key of optim.schedule=wsd (not {self.schedule}); leave it null")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class BackpropOptions:
    grad_clip: float = 1.0           # global gradient-norm clip; 0 = off

    def check(self) -> None:
        need(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")


@dataclass
class SGDOptions(BackpropOptions):
    momentum: float = 0.9
    nesterov: bool = False

    def check(self) -> None:
        super().check()
        need(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")


@dataclass
class AdamWOptions(BackpropOptions):
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def check(self) -> None:
        super().check()
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
             "must be two numbers in [0, 1)")
        positive(self, "eps")


@dataclass
class NoOptions:
    pass


def grads_finite(params) -> bool:
    """Whether every gradient of ``params`` is finite (one reduction, one host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.float().abs().sum() for g in grads]).sum()))


class OptimizerPlugin(ABC):
    Config = NoOptions           # the plugin's own options (``optim.<key>``)
    needs_backprop = True
    steps_torch_optimizer = False  # True: ``self.optimizer`` is a torch optimizer (DeepSpeed can step it)
    needs_grad_allreduce = True  # False: the plugin owns its exchange (no DDP all-reduce)
    per_rank_state = False       # True: state_dict differs between ranks (checkpointed per rank)

    def __init__(self, cfg, model: torch.nn.Module, *, max_steps: int, world=None, meter=None):
        self.cfg, self.model, self.max_steps, self.world, self.meter = cfg, model, max_steps, world, meter

    def trainable(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, lr=c.lr, max_steps=self.max_steps, schedule=c.schedule,
                     warmup_steps=c.warmup_steps, min_lr_ratio=c.min_lr_ratio, decay_start=c.decay_start)

    @abstractmethod
    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        """This rank's loss on ``batch`` (and its gradients, for backprop plugins)."""

    def local_finite(self) -> bool:
        return True

    def agreement(self) -> Optional[tuple[float, bool]]:
        """(mean loss over ranks, every rank finite) when ``compute``'s own exchange agreed
        them already; None: the trainer agrees them with its control all-reduce."""
        return None

    @abstractmethod
    def apply(self, step: int) -> dict[str, float]:
        """Update the parameters for ``step``; returns metrics (at least ``lr``)."""

    def discard(self) -> None:
        pass

    def consensus_state(self) -> dict:
        """Tensors besides the sync strategy's that this plugin keeps bitwise equal on every
        rank (``thinwire.trainer.drift``); none by default."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def some_rank_holds_none(p: torch.Tensor) -> bool:
    """Whether FSDP2 (``torch.chunk`` of dim 0 over the mesh) leaves some rank none of ``p``:
    the same answer on every rank (from the global shape)."""
    if not hasattr(p, "device_mesh") or p.dim() == 0:
        return False
    n, s = p.shape[0], p.device_mesh.size()
    return n == 0 or math.ceil(n / math.ceil(n / s)) < s


class OwnUpdatePlugin(OptimizerPlugin):
    """A backprop plugin that updates ``self.params`` itself from their gradients, with no
    torch optimizer behind it (DeMo, adam1bit): the forward/backward, the finiteness check
    and the discard of a rejected step."""
    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        named = self.trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = [p.dim() >= 2 for p in self.params]  # decoupled weight decay on matrices only
        empty = [n for n, p in named if some_rank_holds_none(p)]
        if empty:
            raise ConfigError(f"engine.shard_group_size: {empty[0]} has fewer rows than an island has ranks, so "
                              f"some rank holds none of it; optim={getattr(cfg, 'name', '?')} runs on every rank's "
                              f"rows of every parameter: use a smaller engine.shard_group_size")

    def _zero_grads(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        self._zero_grads()
        loss = forward_model(**batch)
        loss.backward()
        return loss.detach()

    def local_finite(self) -> bool:
        return grads_finite(self.params)

    def discard(self) -> None:
        self._zero_grads()


class BackpropPlugin(OptimizerPlugin):
    """A torch optimizer on backprop gradients; weight decay only on matrices (>= 2-D),
    never on biases, norm weights or embeddings' 1-D companions (nanoGPT's grouping)."""

    Config = BackpropOptions
    steps_torch_optimizer = True     # self.optimizer is a torch optimizer (engines like DeepSpeed step it)

    def __init__(self, cfg, model, **kw):
        super().__init__(cfg, model, **kw)
        params = self.trainable(model)
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.params = [p for _, p in params]
        self.optimizer = self.make_optimizer([g for g in groups if g["params"]])

    @abstractmethod
    def make_optimizer(self, groups) -> torch.optim.Optimizer:
        """The torch optimizer over ``groups`` (decay / no-decay parameter groups)."""

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        loss = forward_model(**batch)
        loss.backward()
        return loss.detach()

    def local_finite(self) -> bool:
        return grads_finite(self.params)

    def apply(self, step: int) -> dict[str, float]:
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = {"lr": lr}
        if self.cfg.grad_clip > 0:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.optimizer.step()
        return out

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


@OPTIMIZERS.register("sgd")
class SGDPlugin(BackpropPlugin):
    Config = SGDOptions

    def make_optimizer(self, groups):
        c = self.cfg
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)


@OPTIMIZERS.register("adamw")
class AdamWPlugin(BackpropPlugin):
    Config = AdamWOptions

    def make_optimizer(self, groups):
        c = self.cfg
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)


def build_optimizer(cfg, model, **kw) -> OptimizerPlugin:
    return OPTIMIZERS.get(cfg.name, "optim")(cfg, model, **kw)

