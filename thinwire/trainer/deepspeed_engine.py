"""``engine=deepspeed``: DeepSpeed ZeRO (stage 1 or 2) under thinwire's loop.

thinwire keeps the loop, data, metrics, run dir and checkpoint directory; DeepSpeed gets
the model and the optimizer plugin's torch optimizer (``optim=sgd|adamw``, never a
JIT-compiled op) and owns what ZeRO must own: gradient reduction, the sharded optimizer
step and the parameter all-gather. The parts:

- ``thinwire.trainer.deepspeed_config``: the options (``engine.deepspeed`` is DeepSpeed's
  own config, passed through), the rules checked before a run, the config handed to
  ``deepspeed.initialize``;
- this module: :class:`DeepSpeedEngine`, the engine the loop calls
  (``thinwire.trainer.interface.Engine``);
- ``thinwire.trainer.zero_step``: ``ZeroStep``, the plugin as the loop drives it once
  :meth:`DeepSpeedEngine.attach` has wrapped it (forward/backward/step through DeepSpeed,
  ZeRO's wire bytes);
- ``thinwire.trainer.deepspeed_private``: every access to DeepSpeed's private attributes;
- ``thinwire.trainer.zero_replicas``: with ``sync=local|co2``, ZeRO runs inside replica
  groups of ``engine.zero_group_size`` ranks and the outer loop averages across the groups
  (through thinwire's comm layer, accounted there like every outer average).
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from ..comm import accounting
from ..comm import hooks
from . import deepspeed_private, zero_replicas
from .deepspeed_config import DeepSpeedOptions, check_config, deepspeed_config, is_two_phase
from .interface import Engine, CommStateMethods
from .zero_step import ZeroStep


class DeepSpeedEngine(CommStateMethods, Engine):
    """The loop's engine (``thinwire.trainer.interface.Engine``); ``forward_model`` is the
    DeepSpeed engine once :meth:`attach` has handed it the optimizer, ``ds`` that engine."""

    Config = DeepSpeedOptions
    check_run = staticmethod(check_config)
    # DeepSpeed's load_checkpoint reads its files with torch.load(weights_only=False): resuming
    # needs trainer.trust_checkpoints=true (thinwire.trainer.checkpoint, "Loading is safe")
    unpickles_checkpoints = True

    def __init__(self, cfg, model: torch.nn.Module, world, meter, comm_cfg, *, grad_sync: bool,
                 comm_hook: hooks.CommHookFactory = hooks.comm_hook):
        if comm_hook is not hooks.comm_hook:
            raise ValueError("engine=deepspeed: DeepSpeed reduces gradients itself; no comm hook can be plugged in")
        self.cfg, self.module, self.world, self.meter = cfg, model, world, meter
        self.numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.forward_model = model
        self.ds = None
        self.ds_config: dict = {}
        # no gradient sync across all ranks (sync=local|co2): ZeRO inside replica groups
        self.replicas = None if grad_sync else zero_replicas.ReplicaGroups(
            world, zero_replicas.group_size(cfg.zero_group_size, world.world_size), meter,
            two_phase=is_two_phase(comm_cfg))
        self.dp_size = self.replicas.size if self.replicas else world.world_size

    def attach(self, plugin, batch_size: int) -> ZeroStep:
        """Build the DeepSpeed engine around the plugin's torch optimizer; the loop then
        drives the returned :class:`ZeroStep` like any plugin."""
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed_private.skip_op_builds()
        os.environ.setdefault("LOCAL_RANK", str(self.world.local_rank))
        self.ds_config = deepspeed_config(self.cfg, plugin.cfg, batch_size, self.dp_size)
        # ZeRO calls torch's all_gather_into_tensor, which torch 2.13 deprecates (once per process)
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
        self.ds, _, _, _ = deepspeed.initialize(model=self.module, optimizer=plugin.optimizer,
                                                config=self.ds_config, dist_init_required=False, mpu=self.replicas)
        if self.replicas is not None:
            self.replicas.optimizer = self.ds.optimizer
        # DeepSpeed broadcasts rank 0's parameters at initialisation: setup traffic
        self.meter.charge(accounting.collective_bytes(
            "broadcast", sum(p.numel() * p.element_size() for p in self.module.parameters()), 1,
            self.dp_size), kind="setup")
        self.forward_model = self.ds
        in_group = self.replicas is not None and self.replicas.size > 1
        return ZeroStep(plugin, self.ds, self.ds_config, self.meter, numel=self.numel, dp_size=self.dp_size,
                        zero_group=self.replicas.zero_group if in_group else None, device=self.world.device)

    # checkpoint: DeepSpeed's own sharded files inside thinwire's atomic checkpoint directory
    def _ds_dir(self, directory: str) -> str:
        """Replica groups each write DeepSpeed's files (same names) into a directory of their own."""
        return directory if self.replicas is None else os.path.join(directory, f"replica{self.replicas.replica}")

    def save_extra(self, directory: str) -> None:
        self.ds.save_checkpoint(self._ds_dir(directory), tag="deepspeed", save_latest=False)

    def load_extra(self, directory: str, same_world: bool) -> None:
        """Model, ZeRO shards of the optimizer state and its fp32 master weights. Another
        world size re-shards nothing: the module is loaded, the optimizer state starts fresh."""
        self.ds.load_checkpoint(self._ds_dir(directory), tag="deepspeed", load_optimizer_states=same_world,
                                load_lr_scheduler_states=False, load_module_only=not same_world)
        if not same_world and self.world.is_main:
            print(f"thinwire: warning: {directory}: DeepSpeed's optimizer state is sharded for another "
                  f"world size; only the model is restored, the optimizer state starts fresh", flush=True)
