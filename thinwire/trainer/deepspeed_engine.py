"""``engine=deepspeed``: DeepSpeed ZeRO (stage 1 or 2) under thinwire's loop.

thinwire keeps the loop, data, metrics, run dir and checkpoint directory; DeepSpeed gets
the model and the optimizer plugin's torch optimizer (``optim=sgd|adamw``, never a
JIT-compiled op) and owns what ZeRO must own: gradient reduction, the sharded optimizer
step and the parameter all-gather. ``engine.deepspeed`` is DeepSpeed's own config, passed
through; thinwire fills in the keys it owns (batch sizes, accumulation = 1, the
optimizer, gradient clipping from ``optim.grad_clip``) and rejects them if set.

The loop drives the plugin as usual; :meth:`DeepSpeedEngine.attach` wraps the plugin in
:class:`ZeroStep`, which routes forward/backward/step through the DeepSpeed engine.

Wire bytes: DeepSpeed's collectives bypass thinwire's accounting wrappers, so the bytes
of each step are computed from what ZeRO-1/2 sends in DeepSpeed 0.19.8 (checked against
DeepSpeed's own comms logger in tests/test_deepspeed.py), with n = trainable elements,
p = world size, b_grad = ``communication_data_type`` size (default: the parameter dtype's),
b_param = 2 with bf16 else 4::

    gradients, in backward (default: use_multi_rank_bucket_allreduce: true,
      or reduce_scatter: false)      all-reduce of every bucket    2 (p-1)/p * n * b_grad
    gradients, reduce_scatter: true and use_multi_rank_bucket_allreduce: false
                                     reduce of each slice to its owner  (p-1)/p * n * b_grad
    parameters, after the step       all-gather of the updated shards   (p-1)/p * n * b_param

The scalar all-reduces of overflow flags and gradient norms (4-12 bytes) are left out.

With ``sync=local|co2``, ZeRO runs inside replica groups of ``engine.zero_group_size``
ranks (p above is then the group's size) and the outer loop averages across the groups
(``thinwire.trainer.zero_replicas``); those averages go through thinwire's comm layer and
are accounted there, like every outer average.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch

from ..comm import accounting
from ..comm.aggregator import check_combination
from ..errors import ConfigError
from . import zero_replicas

SUPPORTED = ("engine=deepspeed works with sync=ddp and comm=none, or sync=local|co2 across ZeRO replica groups "
             "(engine.zero_group_size ranks each, any comm= for the outer average); optim=sgd|adamw; "
             "engine.deepspeed.zero_optimization.stage=1|2")
# keys thinwire sets itself: the loop, the data and the optimizer plugin decide them
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
         "scheduler")
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def _clean(d):
    """Drop null entries (the YAML lists optional keys as null), recursively."""
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items() if v is not None}
    return d


def _stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def default_deepspeed_config() -> dict:
    """DeepSpeed's own config (passed to ``deepspeed.initialize``; null entries are left out)."""
    return {
        "zero_optimization": {
            "stage": 2,                         # 1: optimizer state sharded | 2: + gradients sharded
            "reduce_scatter": True,             # false: gradients all-reduced
            # false (with reduce_scatter): each gradient slice is reduced to its owner only:
            # half the gradient bytes of an all-reduce
            "use_multi_rank_bucket_allreduce": True,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 500000000,
            "allgather_bucket_size": 500000000,
            "offload_optimizer": {"device": "none"},  # cpu: optimizer state and step in host memory
        },
        "bf16": {"enabled": False},             # bf16 parameters and gradients, fp32 master weights
        "communication_data_type": None,        # gradient reduction dtype: fp32 | bf16 (null = parameter dtype)
        "gradient_clipping": None,              # null = optim.grad_clip
    }


@dataclass
class DeepSpeedOptions:
    deepspeed: dict = field(default_factory=default_deepspeed_config)
    zero_group_size: Optional[int] = None  # sync=local|co2: ranks per ZeRO replica group (null = ranks per node)


def check_config(cfg) -> None:
    """Combinations ``engine=deepspeed`` supports, from the parts' capability flags; each
    failure is one ConfigError line."""
    from omegaconf import OmegaConf

    from ..comm.sync import SYNC_STRATEGIES
    from ..optim.plugins import OPTIMIZERS

    ds = _clean(OmegaConf.to_container(cfg.engine.deepspeed, resolve=True))

    def need(cond: bool, key: str, value, why: str = "") -> None:
        if not cond:
            raise ConfigError(f"{key}={value}: {why or 'not supported'}; {SUPPORTED}")

    if importlib.util.find_spec("deepspeed") is None:  # no import here: it takes seconds
        raise ConfigError("engine=deepspeed: DeepSpeed is not installed (pip install 'thinwire[deepspeed]')")
    strategy = SYNC_STRATEGIES.get(cfg.sync.name, "sync")
    need(strategy.needs_grad_allreduce or getattr(strategy, "supports_replica_groups", False), "sync", cfg.sync.name)
    world = int(os.environ.get("WORLD_SIZE", cfg.dist.nproc))
    size = zero_replicas.group_size(cfg.engine.zero_group_size, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if strategy.needs_grad_allreduce:
        need(cfg.comm.name == "none", "comm", cfg.comm.name,
             "DeepSpeed reduces gradients itself and has no compression hook (engine.deepspeed."
             "communication_data_type=bf16 halves gradient bytes)")
        need(cfg.engine.zero_group_size in (None, world), "engine.zero_group_size", cfg.engine.zero_group_size,
             f"sync=ddp runs ZeRO over all {world} ranks; replica groups are for sync=local|co2")
    else:
        need(size >= 1 and world % size == 0 and world // size >= 2, "engine.zero_group_size", size,
             f"sync={cfg.sync.name} averages across ZeRO replica groups: the group size must divide the "
             f"world size ({world}) into at least 2 groups")
    need(getattr(OPTIMIZERS.get(cfg.optim.name, "optim"), "steps_torch_optimizer", False), "optim", cfg.optim.name,
         "DeepSpeed steps a torch optimizer")
    need(_stage(ds) in (1, 2), "engine.deepspeed.zero_optimization.stage", _stage(ds),
         "stage 0 is plain data parallelism (use engine=ddp); stage 3 is not wired in")
    for key in OWNED:
        need(key not in ds, f"engine.deepspeed.{key}", ds.get(key),
             "set by thinwire (data.batch_size, optim=...); remove it")
    need(not (ds.get("bf16", {}).get("enabled", False) and _stage(ds) == 1), "engine.deepspeed.bf16.enabled", True,
         "with zero_optimization.stage=1 DeepSpeed switches to its BF16_Optimizer, which thinwire does not drive; "
         "use stage 2")
    need(not ds.get("fp16", {}).get("enabled", False) or torch.cuda.is_available(),
         "engine.deepspeed.fp16.enabled", True, "fp16 needs a GPU; use bf16")
    clip = ds.get("gradient_clipping", 0.0)
    need(not (clip and cfg.optim.grad_clip and clip != cfg.optim.grad_clip), "engine.deepspeed.gradient_clipping",
         clip, f"disagrees with optim.grad_clip={cfg.optim.grad_clip}; set one of them")
    comm_dtype = ds.get("communication_data_type")
    need(comm_dtype is None or comm_dtype in DTYPE_BYTES, "engine.deepspeed.communication_data_type", comm_dtype,
         "expected fp32 | bf16 | fp16")


def deepspeed_config(engine_cfg, optim_cfg, batch_size: int, world_size: int) -> dict:
    """DeepSpeed's config: ``engine.deepspeed`` plus the keys thinwire owns."""
    from omegaconf import OmegaConf

    ds = _clean(OmegaConf.to_container(engine_cfg.deepspeed, resolve=True))
    ds.update({
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world_size,
        "gradient_clipping": ds.get("gradient_clipping") or float(optim_cfg.grad_clip),
        "zero_allow_untested_optimizer": True,   # the plugin's torch optimizer
        "zero_force_ds_cpu_optimizer": False,    # offload with a torch optimizer, not cpu_adam
    })
    ds.setdefault("steps_per_print", 2 ** 62)
    return ds


def wire_bytes_per_step(ds: dict, numel: int, world_size: int) -> tuple[int, int]:
    """ZeRO-1/2 traffic of one step per rank (module docstring): (gradient reduction in
    backward, all-gather of the updated parameters after the step)."""
    bf16 = ds.get("bf16", {}).get("enabled", False)
    b_param = 2 if bf16 else 4
    b_grad = DTYPE_BYTES[ds["communication_data_type"]] if ds.get("communication_data_type") else b_param
    zero = ds.get("zero_optimization", {})
    to_owners = zero.get("reduce_scatter", True) and not zero.get("use_multi_rank_bucket_allreduce", True)
    # a reduce of each 1/p slice to its owner sends what a reduce-scatter sends
    grads = "reduce_scatter" if to_owners else "all_reduce"
    return (accounting.collective_bytes(grads, numel, b_grad, world_size),
            accounting.collective_bytes("reduce_scatter", numel, b_param, world_size))  # = the all-gather


def is_two_phase(comm_cfg) -> bool:
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(comm_cfg, resolve=True)
    name = fields.pop("name")
    return name != "none" and check_combination(name, fields) == "two_phase"


class DeepSpeedEngine:
    """Same interface as ``DDPEngine``; ``forward_model`` is the DeepSpeed engine once
    :meth:`attach` has handed it the optimizer."""

    Config = DeepSpeedOptions
    check_run = staticmethod(check_config)
    # DeepSpeed's load_checkpoint reads its files with torch.load(weights_only=False): resuming
    # needs trainer.trust_checkpoints=true (thinwire.trainer.checkpoint, "Loading is safe")
    unpickles_checkpoints = True

    def __init__(self, cfg, model: torch.nn.Module, world, meter, comm_cfg, *, grad_sync: bool):
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

    def attach(self, plugin, batch_size: int):
        """Build the DeepSpeed engine around the plugin's torch optimizer; the loop then
        drives the returned :class:`ZeroStep` like any plugin."""
        import deepspeed
        import deepspeed.ops

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (inference only) when
        # its op table says the op is buildable; an empty table skips that compile and the
        # compiler probing: every collective goes through torch.distributed (gloo / NCCL).
        deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
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
        return ZeroStep(plugin, self)

    # the loop's engine interface: DeepSpeed has no thinwire comm hook
    def comm_tail_s(self, backward_end: float, step_start: float) -> float:
        return 0.0

    def set_lr(self, lr: float) -> None:
        pass

    def take_comm_stats(self) -> dict:
        return {}

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def comm_state_dict(self) -> dict:
        return {}

    def load_comm_state_dict(self, state: dict) -> None:
        pass

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


class ZeroStep:
    """The optimizer plugin as the loop sees it, with DeepSpeed doing backward and step.

    The plugin still defines the learning rate schedule and its optimizer (handed to
    DeepSpeed, which shards its state); DeepSpeed owns backward (gradient reduction into
    the shards), clipping, the step and the all-gather of the updated parameters."""

    needs_backprop = True

    def __init__(self, plugin, engine: DeepSpeedEngine):
        self.plugin, self.engine, self.ds = plugin, engine, engine.ds
        self.cfg = plugin.cfg
        self.grad_bytes, self.param_bytes = wire_bytes_per_step(engine.ds_config, engine.numel, engine.dp_size)

    def lr(self, step: int) -> float:
        return self.plugin.lr(step)

    def compute(self, forward_model, batch: dict) -> torch.Tensor:
        loss = self.ds(**batch)
        self.ds.backward(loss)  # reduces gradients into this rank's shard (ZeRO-2: bucket by bucket)
        self.engine.meter.charge(self.grad_bytes)
        return loss.detach()

    def local_finite(self) -> bool:
        """Finite gradients in this rank's shard. The loop agrees across all ranks under
        sync=ddp; replica groups step independently, so the ranks of a group agree here."""
        opt = self.ds.optimizer
        finite = not (opt.local_overflow if getattr(opt, "cpu_offload", False)
                      else bool(opt.has_overflow_partitioned_grads_serial()))
        groups = self.engine.replicas
        if groups is None or groups.size == 1:
            return finite
        flag = torch.tensor([1.0 if finite else 0.0], device=self.engine.world.device)
        accounting.all_reduce(self.engine.meter, flag, op=torch.distributed.ReduceOp.MIN, group=groups.zero_group,
                              kind="control")
        return bool(flag.item() == 1.0)

    def apply(self, step: int) -> dict[str, float]:
        lr = self.lr(step)
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr
        self.ds.step()
        self.engine.meter.charge(self.param_bytes)
        out = {"lr": lr}
        if self.engine.ds_config["gradient_clipping"] > 0:
            out["grad_norm"] = float(self.ds.get_global_grad_norm())
        return out

    def discard(self) -> None:
        """Drop this step's reduced gradients the way DeepSpeed drops an fp16 overflow step
        (every rank calls this together: the loop agreed to skip)."""
        opt = self.ds.optimizer
        with mock.patch.object(opt, "check_grad_overflow", True), \
                mock.patch.object(opt, "check_overflow", lambda **kw: setattr(opt, "overflow", True)):
            self.ds.step()

    def state_dict(self) -> dict:
        return {}  # the optimizer state is in DeepSpeed's sharded checkpoint files

    def load_state_dict(self, state: dict) -> None:
        pass
