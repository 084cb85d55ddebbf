"""The data-parallel engine: wraps the model in torch DDP with thinwire's comm hook, or
leaves it unwrapped when nothing is all-reduced per step (local updates, zeroth order).

Engines form a closed registry (``engine=ddp``; DeepSpeed joins it as ``deepspeed``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from ..comm import accounting
from ..comm.hooks import comm_hook
from ..errors import positive
from ..registry import Registry

ENGINES: Registry[type] = Registry("engine", "thinwire.engines")


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
class DDPEngine:
    """``forward_model`` is what the loop calls (DDP or the bare module); ``module`` the model."""

    Config = DDPOptions

    def __init__(self, cfg, model: torch.nn.Module, world, meter, comm_cfg, *, grad_sync: bool):
        self.module = model
        self.world = world
        self.meter = meter
        self.hook_state = None
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
        if self.hook_state is None or self.hook_state.last_launch_s < step_start:
            return 0.0
        return max(0.0, backward_end - self.hook_state.last_launch_s)

    def set_lr(self, lr: float) -> None:
        """Tell the hook this step's learning rate (error-feedback residual rescaling)."""
        if hasattr(self.hook_state, "set_lr"):
            self.hook_state.set_lr(lr)

    def take_comm_stats(self) -> dict:
        """Compression ratio and residual norm of the step just finished."""
        return self.hook_state.take_stats() if hasattr(self.hook_state, "take_stats") else {}

    def commit(self) -> None:
        if self.hook_state is not None:
            self.hook_state.commit()

    def discard(self) -> None:
        if self.hook_state is not None:
            self.hook_state.discard()

    def comm_state_dict(self) -> dict:
        return self.hook_state.state_dict() if self.hook_state is not None else {}

    def load_comm_state_dict(self, state: dict) -> None:
        if self.hook_state is not None and state:
            self.hook_state.load_state_dict(state)


def build_engine(cfg, model, world, meter, comm_cfg, *, grad_sync: bool):
    return ENGINES.get(cfg.name, "engine")(cfg, model, world, meter, comm_cfg, grad_sync=grad_sync)




from .deepspeed_engine import DeepSpeedEngine  # noqa: E402  (deepspeed itself is imported on use)

ENGINES.register("deepspeed")(DeepSpeedEngine)
