"""The data-parallel engine: wraps the model in torch DDP with a comm hook (thinwire's by
default), or leaves it unwrapped when nothing is all-reduced per step (local updates,
zeroth order).

Engines form a closed registry (``engine=ddp``; DeepSpeed joins it as ``deepspeed``); each
implements :class:`thinwire.trainer.interface.Engine`, the interface the loop calls.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from ..comm import accounting
from ..comm.hooks import CommHookFactory, HookState, comm_hook
from ..errors import positive
from ..registry import Registry
from .deepspeed_engine import DeepSpeedEngine  # deepspeed itself is imported on use
from .fsdp2_engine import FSDP2Engine
from .interface import CommStateMethods, Engine

ENGINES: Registry[Callable[..., Engine]] = Registry("engine", "thinwire.engines")


@dataclass
class EngineConfig:
    """The group-wide keys of ``engine``; each engine's own options are its ``Config``."""
    name: str = "ddp"


@dataclass
class DDPOptions:
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    find_unused_parameters: bool = False

    def check(self) -> None:
        positive(self, "bucket_cap_mb")


@ENGINES.register("ddp")
class DDPEngine(CommStateMethods, Engine):
    """``forward_model`` is what the loop calls (DDP or the bare module); ``module`` the model;
    ``hook_state`` the comm hook's state (a ``thinwire.comm.hooks.HookState``) that
    ``comm_hook`` built."""

    Config = DDPOptions

    def __init__(self, cfg, model: torch.nn.Module, world, meter, comm_cfg, *, grad_sync: bool,
                 comm_hook: CommHookFactory = comm_hook):
        self.module = model
        self.world = world
        self.meter = meter
        self.replicas = None
        self.hook_state = HookState(meter=meter)  # comm=none's state: nothing is all-reduced per step
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not grad_sync:
            self.forward_model = model
            return
        # DDP broadcasts rank 0's parameters once at construction: setup traffic
        meter.charge(accounting.collective_bytes(
            "broadcast", sum(p.numel() * p.element_size() for p in model.parameters()), 1,
            world.world_size), kind="setup")
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        with warnings.catch_warnings():  # torch 2.13 deprecates the name, not the behaviour we need:
            warnings.simplefilter("ignore", FutureWarning)  # no per-forward buffer broadcast
            self.forward_model = DDP(model, device_ids=device_ids, bucket_cap_mb=cfg.bucket_cap_mb,
                                     gradient_as_bucket_view=cfg.gradient_as_bucket_view,
                                     find_unused_parameters=cfg.find_unused_parameters,
                                     broadcast_buffers=False)
        fields = OmegaConf.to_container(comm_cfg, resolve=True)
        name = fields.pop("name")
        self.hook_state, hook = comm_hook(name, process_group=None, second_group=world.async_group,
                                          meter=meter, model=model, auto_commit=False, **fields)
        self.forward_model.register_comm_hook(self.hook_state, hook)

    def attach(self, plugin, batch_size: int):
        """The plugin the loop drives (DeepSpeed wraps it; DDP leaves it as it is)."""
        return plugin

    def save_extra(self, directory: str) -> None:
        """Engine-owned files written into the checkpoint directory (DeepSpeed's shards)."""

    def load_extra(self, directory: str, same_world: bool) -> None:
        pass

    def comm_tail_s(self, backward_end: float, step_start: float) -> float:
        """Time backward spent waiting for buckets after the last one was launched: the part
        of the gradient communication that compute did not hide."""
        if self.hook_state.last_launch_s < step_start:
            return 0.0
        return max(0.0, backward_end - self.hook_state.last_launch_s)



ENGINES.register("deepspeed")(DeepSpeedEngine)
# engine=fsdp2: FSDP2 / HSDP (thinwire/trainer/fsdp2_engine.py; torch.distributed.fsdp imported on use)
ENGINES.register("fsdp2")(FSDP2Engine)


def build_engine(cfg, model, world, meter, comm_cfg, *, grad_sync: bool,
                 comm_hook: CommHookFactory = comm_hook) -> Engine:
    """The engine ``cfg.name`` (``engine.*``) around ``model``; ``comm_hook`` builds the
    per-bucket comm hook (thinwire's by default; a benchmark passes a peer's)."""
    return ENGINES.get(cfg.name, "engine")(cfg, model, world, meter, comm_cfg, grad_sync=grad_sync,
                                            comm_hook=comm_hook)
