"""Sync strategies: when workers synchronise. A closed registry, extensible through the
``thinwire.sync`` entry-point group.

A strategy declares what the engine must do for it:

- ``needs_grad_allreduce``: gradients are averaged every step (DDP + comm hook). When
  False (local updates, zeroth order) the model is not wrapped in DDP at all, so there
  is no per-step gradient sync and no buffer broadcast the accounting cannot see;
- ``ranks_diverge``: ranks hold different parameters between synchronisations, so the
  checkpoint stores model and optimizer per rank, and the drift guard
  (``thinwire.trainer.drift``) checks only what the strategy declares in ``consensus_state``
  (none declared: the guard is off, with one start-up line);
- ``supports_replica_groups``: it can average across replica groups that shard the model
  inside themselves (``engine=deepspeed``); it then gets ``replicas``
  (``thinwire.comm.param_space.Replicas``);
- ``carries_stop``: with ``ranks_diverge``, its synchronisations carry a Ctrl-C vote: the
  trainer sets ``stop_vote`` before each ``global_step``; a synchronisation (every rank
  together) counts the votes in a control all-reduce it makes anyway and sets
  ``stop_agreed`` on every rank alike, so all stop after the same step with a checkpoint
  (``thinwire.trainer.progress.StopRequest``; the trainer clears it once read).

The built-in ``local`` and ``co2`` (one strategy running a plain-data round, ``local.py`` and
``rounds.py``) are imported by ``thinwire.comm`` through ``outer.py`` (so they are registered
whenever this module is).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..registry import Registry

SYNC_STRATEGIES: Registry[type] = Registry("sync", "thinwire.sync")


@dataclass
class SyncConfig:
    """The group-wide keys of ``sync``; each strategy adds its own ``Config``."""
    name: str = "ddp"


@dataclass
class NoOptions:
    pass


class SyncStrategy:
    Config = NoOptions           # the strategy's own options (``sync.<key>``)
    needs_grad_allreduce = True
    ranks_diverge = False
    supports_replica_groups = False
    carries_stop = False

    def __init__(self, cfg, world, meter, model, comm_cfg=None, replicas=None):
        self.cfg, self.world, self.meter, self.model, self.comm_cfg = cfg, world, meter, model, comm_cfg
        self.stop_vote, self.stop_agreed = False, False  # Ctrl-C (``carries_stop``)

    def bind_optimizer(self, plugin) -> None:
        """The trainer's optimizer plugin, once built (a strategy that averages the inner
        optimizer's state reaches it here: ``plugin.optimizer``)."""

    def after_step(self, step: int) -> dict[str, float]:
        """Called after every accepted optimizer step; returns metrics to log."""
        return {}

    def global_step(self, step: int, skipped: bool = False) -> dict[str, float]:
        """Called by every rank once per global step (the trainer, ``thinwire.OuterLoop``):
        ``after_step`` for an accepted step, and for a step this rank skipped when ranks
        diverge (local updates / CO2: the round's outer collective still needs this rank, which
        joins with its parameters as they were before the skipped step)."""
        if skipped and not self.ranks_diverge:
            return {}
        return self.after_step(step)

    @property
    def round_steps(self) -> int:
        """Steps per synchronisation round: the state of ``consensus_state`` is defined at
        multiples of it."""
        return 1

    def consensus_state(self) -> dict | None:
        """The tensors that must be bitwise equal on every rank of ``consensus_group`` at the
        end of a round (``thinwire.trainer.drift``): the parameters when ranks never diverge;
        None (declares none: the guard is off) when they do, unless the strategy overrides it."""
        return None if self.ranks_diverge else dict(self.model.named_parameters())

    @property
    def consensus_group(self):
        """The ranks that must agree on ``consensus_state`` (None: all of them)."""
        return None

    @contextlib.contextmanager
    def eval_model(self):
        """The model evaluated and sampled from (identical on all ranks), as a context."""
        yield self.model

    def close(self) -> None:
        """Finish any communication still in flight."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def load_consensus_state(self, state: dict) -> bool:
        """Resuming on another world size: restore from one rank's ``state_dict`` what every rank
        holds alike (an outer loop's round counter, anchor and outer-optimizer state) and leave
        the per-rank rest at its fresh value; True if anything was restored."""
        return False


@SYNC_STRATEGIES.register("ddp")
class EveryStep(SyncStrategy):
    """Gradients averaged every step by DDP's comm hook; nothing to do after the step."""


def build_sync(cfg, world, meter, model, comm_cfg=None, replicas=None) -> SyncStrategy:
    """``replicas``: the engine's replica groups when it shards state inside groups of ranks
    (``engine=deepspeed`` with local/CO2: a ``thinwire.comm.param_space.Replicas``, implemented by
    ``thinwire.trainer.zero_replicas.ReplicaGroups``); strategies that synchronise
    parameters then average across the groups, not across all ranks."""
    return SYNC_STRATEGIES.get(cfg.name, "sync")(cfg, world, meter, model, comm_cfg, replicas)
