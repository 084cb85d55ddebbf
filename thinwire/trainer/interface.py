"""The engine interface: what the training loop (``thinwire.trainer.loop.Trainer``) calls on
an engine, and what an engine class is built from.

An engine owns how gradients reach the optimizer: ``engine=ddp`` wraps the model in torch
DDP with a comm hook (``thinwire.trainer.engine.DDPEngine``), ``engine=deepspeed`` hands
model and optimizer to DeepSpeed ZeRO (``thinwire.trainer.deepspeed_engine``). Engine
classes form a closed registry (``thinwire.trainer.engine.ENGINES``, extensible through the
``thinwire.engines`` entry-point group); each is called as::

    engine_cls(cfg, model, world, meter, comm_cfg, grad_sync=..., comm_hook=...)

``grad_sync``: gradients are averaged every step (False under local updates / zeroth
order: nothing is all-reduced per step). ``comm_hook``: the factory of the per-bucket comm
hook (``thinwire.comm.hooks.comm_hook`` by default, a ``CommHookFactory``); a benchmark
passes a peer's hook here. An engine that reduces gradients itself (DeepSpeed) refuses any
other factory.

One step, as the loop calls it::

    engine.set_lr(lr)                                  # before backward (the hook rescales EF)
    loss = plugin.compute(engine.forward_model, batch) # plugin = engine.attach(...) at build
    tail = engine.comm_tail_s(backward_end, step_start)
    accepted: plugin.apply(step); engine.commit(); metrics |= engine.take_comm_stats()
    rejected: plugin.discard(); engine.discard(); engine.take_comm_stats()
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..comm.param_space import Replicas
from ..optim.plugins import OptimizerPlugin


class Engine(Protocol):
    """What the training loop uses of an engine (see the module docstring).

    ``module``: the model; ``forward_model``: what the plugin runs forward through (the DDP
    wrapper, DeepSpeed's engine, or the model itself); ``numel``: trainable elements (the
    dense reference of the wire-byte metrics); ``replicas``: the replica groups the sync
    strategy averages across when the engine shards state inside groups of ranks (None:
    every rank holds a whole replica)."""

    module: torch.nn.Module
    forward_model: torch.nn.Module
    numel: int
    replicas: Optional[Replicas]
    # its checkpoint loader unpickles (a resume then needs trainer.trust_checkpoints=true)
    unpickles_checkpoints: bool = False

    def attach(self, plugin: OptimizerPlugin, batch_size: int) -> OptimizerPlugin:
        """The plugin the loop drives: ``plugin`` itself, or a wrapper that routes backward
        and step through the engine (DeepSpeed's ZeRO step)."""
        ...

    def set_lr(self, lr: float) -> None:
        """This step's learning rate, before backward (error-feedback residual rescaling)."""
        ...

    def comm_tail_s(self, backward_end: float, step_start: float) -> float:
        """Seconds backward waited for gradient communication that compute did not hide."""
        ...

    def commit(self) -> None:
        """The step was accepted: apply the comm state staged during backward."""
        ...

    def discard(self) -> None:
        """The step was rejected (non-finite): comm state stays as it was."""
        ...

    def take_comm_stats(self) -> dict:
        """Metrics of the step's gradient communication; resets them."""
        ...

    def comm_state_dict(self) -> dict:
        """Per-rank comm state for the checkpoint (error-feedback buffers, ...)."""
        ...

    def load_comm_state_dict(self, state: dict) -> None:
        ...

    def save_extra(self, directory: str) -> None:
        """Engine-owned files written into the checkpoint directory (DeepSpeed's shards)."""
        ...

    def load_extra(self, directory: str, same_world: bool) -> bool | None:
        """Engine-owned files read back; True: it also restored the sync strategy's state
        (``engine=fsdp2`` under another island size), so the rank files' is not loaded."""
        ...



class NoCommState:
    """The comm state of an engine that reduces gradients itself with nothing of thinwire's
    to follow, stage or checkpoint (DeepSpeed ZeRO; FSDP2 without per-step compression)."""

    def set_lr(self, lr: float) -> None:
        pass

    def take_stats(self) -> dict:
        return {}

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CommStateMethods:
    """:class:`Engine`'s comm-state methods delegated to ``self.hook_state``: a
    ``thinwire.comm.hooks.HookState`` (set_lr/take_stats/commit/discard/state_dict), or
    :class:`NoCommState` by default. ``comm_tail_s`` is 0 here: no hook to wait for."""

    hook_state = NoCommState()

    def comm_tail_s(self, backward_end: float, step_start: float) -> float:
        return 0.0

    def set_lr(self, lr: float) -> None:
        self.hook_state.set_lr(lr)

    def take_comm_stats(self) -> dict:
        return self.hook_state.take_stats()

    def commit(self) -> None:
        self.hook_state.commit()

    def discard(self) -> None:
        self.hook_state.discard()

    def comm_state_dict(self) -> dict:
        return self.hook_state.state_dict()

    def load_comm_state_dict(self, state: dict) -> None:
        if state:
            self.hook_state.load_state_dict(state)
