"""Parameter-efficient fine-tuning: turn the built model into the model that is trained.

``peft=none`` returns the model unchanged. Adapters (``peft=lora``, ``peft=lora_ga``)
register here; they run after the model is built and before the engine wraps it, with
access to the data (LoRA-GA estimates gradients on training batches) and the world (to
average those estimates across ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry

PEFT_METHODS: Registry = Registry("peft", "thinwire.peft")


@dataclass
class PeftConfig:
    """The group-wide keys of ``peft``; a method's own options are its ``Config`` attribute."""
    name: str = "none"


@dataclass
class NoOptions:
    pass


@PEFT_METHODS.register("none")
def no_adapter(cfg, model: torch.nn.Module, *, data=None, world=None, meter=None) -> torch.nn.Module:
    return model


no_adapter.Config = NoOptions  # a method's options are its ``Config`` (never its call signature)


def apply_peft(cfg, model: torch.nn.Module, *, data=None, world=None, meter=None) -> torch.nn.Module:
    return PEFT_METHODS.get(cfg.name, "peft")(cfg, model, data=data, world=world, meter=meter)


from . import lora  # noqa: E402,F401  registers lora and lora_ga (PEFT imported on use)
