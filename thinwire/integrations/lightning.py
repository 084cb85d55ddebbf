"""thinwire's comm hook in PyTorch Lightning: a callback (docs/library.md).

Lightning 2.6's ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` takes a hook but
registers it only when the root device is CUDA (``DDPStrategy._register_ddp_hooks``): on CPU
it is silently never called and every gradient travels uncompressed. This callback registers
the hook itself in ``on_fit_start`` (after the strategy has wrapped the model in DDP, before
the first backward), on CPU and GPU alike, hands it the first optimizer (the learning rate of
the error-feedback rescaling is followed, ``comm_hook(optimizer=)``), and checks before the
first optimizer step that the hook ran, raising if it did not (a strategy that is not DDP, a
model that never reached DDP's reducer).

Checkpoints: Lightning writes rank 0's checkpoint only, and the hook state is per rank, so
the callback keeps it out of Lightning's checkpoint; with ``state_dir`` it writes one file per
rank there (``thinwire-comm-rank<r>.pt``) whenever Lightning saves, and loads them at
``on_fit_start`` when they exist (checked against the comm config and the rank).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel as DDP

from ..comm.accounting import WireMeter
from ..comm.hooks import comm_hook


class ThinwireCommHook(Callback):
    """``ThinwireCommHook("topk", ratio=0.01, feedback="ef")``: the comm config ``name`` with
    ``comm.*`` keys (as ``thinwire.comm_hook``). ``meter``: where bytes are counted (``.meter``);
    ``state_dir``: per-rank hook state files (module docstring)."""

    def __init__(self, name: str = "none", *, meter: Optional[WireMeter] = None,
                 state_dir: Optional[str] = None, **comm):
        self.name, self.comm = name, comm
        self.meter = meter if meter is not None else WireMeter()
        self.state_dir = state_dir
        self.state = None
        self._checked = False

    def _path(self, trainer) -> str:
        return os.path.join(self.state_dir, f"thinwire-comm-rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, DDP):
            raise RuntimeError(f"thinwire: ThinwireCommHook needs strategy='ddp' (DDPStrategy); "
                               f"the model is wrapped in {type(ddp).__name__} under {type(trainer.strategy).__name__}")
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            raise RuntimeError("thinwire: DDPStrategy(ddp_comm_hook=...) is set as well; use one of the two")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.state, hook = comm_hook(self.name, model=pl_module, optimizer=optimizer, meter=self.meter,
                                     **self.comm)
        if self.state_dir and os.path.exists(self._path(trainer)):
            self.state.load_state_dict(torch.load(self._path(trainer)))
        ddp.register_comm_hook(self.state, hook)
        self._checked = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._checked or self.state is None:
            return
        if self.state.last_launch_s == 0.0:
            raise RuntimeError("thinwire: the comm hook registered by ThinwireCommHook did not run during the "
                               "first step (gradients were not all-reduced through DDP's reducer)")
        self._checked = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.state_dir and self.state is not None:
            os.makedirs(self.state_dir, exist_ok=True)
            torch.save(self.state.state_dict(), self._path(trainer))
