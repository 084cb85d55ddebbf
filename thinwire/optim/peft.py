"""Parameter-efficient fine-tuning: turn the built model into the model that is trained.

``peft=none`` returns the model unchanged. Adapters (``peft=lora``, ``peft=lora_ga``)
register here; they run after the model is built and before the engine wraps it, with
access to the data (LoRA-GA estimates gradients on training batches) and the world (to
average those estimates across ranks).

``peft.head_init=class_means`` (any method) first sets a classifier's new head from the
class means of its input features on ``peft.head_init_batches`` batches per rank, forward
passes only (``thinwire.optim.head_init``): the starting point a zeroth-order run needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, one_of, positive
from ..registry import Registry
from .head_init import HEAD_INITS, class_means_head

PEFT_METHODS: Registry = Registry("peft", "thinwire.peft")


@dataclass
class PeftConfig:
    """The group-wide keys of ``peft``; a method's own options are its ``Config`` attribute."""
    name: str = "none"
    head_init: str = "random"        # random (the model's own) | class_means: a new head set from class means (forward only)
    head_init_batches: int = 32      # class_means: training batches per rank (32 x 2 ranks x 16 = 1,024 examples)

    def check(self) -> None:
        one_of(self.head_init, HEAD_INITS, "head_init")
        positive(self, "head_init_batches")


@dataclass
class NoOptions:
    pass


@PEFT_METHODS.register("none")
def no_adapter(cfg, model: torch.nn.Module, *, data=None, world=None, meter=None) -> torch.nn.Module:
    return model


no_adapter.Config = NoOptions  # a method's options are its ``Config`` (never its call signature)


def apply_peft(cfg, model: torch.nn.Module, *, data=None, world=None, meter=None) -> torch.nn.Module:
    method = PEFT_METHODS.get(cfg.name, "peft")
    if getattr(cfg, "head_init", "random") == "class_means":  # before the method: LoRA-GA's estimate sees this head
        init_head(cfg, model, data, meter)
    return method(cfg, model, data=data, world=world, meter=meter)


def setup_batches(data, n: int, device):
    """This rank's ``n`` training batches drawn at steps -1, -2, ... (not the first training
    batches), on ``device``: what one-off setup runs on (LoRA-GA's gradient estimate, a
    class-means head)."""
    return ({k: v.to(device) for k, v in data.train_batch(-(i + 1)).items()} for i in range(n))


def init_head(cfg, model: torch.nn.Module, data, meter) -> float:
    """``peft.head_init=class_means`` on this rank's ``setup_batches``."""
    if data is None:
        raise ValueError("peft.head_init=class_means: needs training data")
    if not getattr(data.info, "num_classes", 0):
        raise ConfigError(f"peft.head_init=class_means: needs a classification data set with labels "
                          f"(data={type(data).__name__} has no classes)")
    batches = setup_batches(data, cfg.head_init_batches, next(model.parameters()).device)
    return class_means_head(model, batches, data.info.num_classes, meter=meter)

